"""SASRec baseline: learns a planted next-item rule (CE and BCE), and as a stage it scores exactly the
users GRLM's evaluation scores, with the same metric code."""

import pytest


def _cyclic_sequences(n_items=30, n_users=300, length=8, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_users):
        start = int(rng.integers(1, n_items + 1))
        out.append([(start + j - 1) % n_items + 1 for j in range(length)])  # i -> i+1 (mod n)
    return out


@pytest.mark.parametrize("loss,layers", [("ce", "sasrec"), ("sampled", "sasrec"), ("bce", "sasrec"),
                                         ("sampled", "ligr")])
def test_sasrec_learns_a_planted_next_item_rule(loss, layers):
    from grlm_ray.stages.baselines import recommend, train_sasrec
    from grlm_ray.core.config import BaselineConfig

    n = 30
    c = BaselineConfig(loss=loss, layers=layers, hidden_size=32, num_layers=1, epochs=40 if loss == "ce" else 60,
                       batch_size=64, learning_rate=5e-3, dropout=0.0, max_len=10, threads=1, negatives=8)
    model, losses, curve, best_epoch, _ = train_sasrec(_cyclic_sequences(n), n, c, progress=False)
    assert curve == [] and best_epoch is None  # no validation: the last epoch's weights
    assert losses[-1] < losses[0] * 0.5
    histories = [[5, 6, 7], [29, 30], [12]]
    top = recommend(model, histories, k=1, max_len=10)
    assert [int(t[0]) for t in top] == [8, 1, 13]


def test_sasrec_keeps_the_best_validated_epoch_and_stops_on_patience():
    """The weights kept are those validated best (not the last epoch's); patience ends training."""
    import torch

    from grlm_ray.core.config import BaselineConfig
    from grlm_ray.stages.baselines import train_sasrec

    scores = iter([0.1, 0.3, 0.2, 0.25, 0.9])  # epoch 5 would win, but patience 2 stops after epoch 4
    seen = []

    def validate(model):
        seen.append({k: v.clone() for k, v in model.state_dict().items()})
        assert not model.training
        return {"ndcg_at_10": next(scores), "recall_at_10": 0.0}

    c = BaselineConfig(hidden_size=16, num_layers=1, epochs=5, batch_size=64, dropout=0.0, max_len=10, threads=1,
                       validation={"users": 10, "patience": 2})
    fit = train_sasrec(_cyclic_sequences(30), 30, c, progress=False, validate=validate)
    assert len(fit.losses) == 4 and [p["epoch"] for p in fit.curve] == [1, 2, 3, 4] and fit.best_epoch == 2
    assert [p["ndcg_at_10"] for p in fit.curve] == [0.1, 0.3, 0.2, 0.25]
    kept = fit.model.state_dict()
    assert all(torch.equal(kept[k], seen[1][k]) for k in kept)
    assert not all(torch.equal(kept[k], seen[3][k]) for k in kept)
    assert fit.seconds > 0


class _Killed(Exception):
    pass


def test_sasrec_killed_mid_training_resumes_to_the_uninterrupted_result():
    """A SASRec training stopped after epoch 3 (a killed job) and resumed from the state checkpointed after
    every epoch ends exactly where the uninterrupted one does: the same losses, validation curve, best epoch
    and weights (dropout and sampled negatives draw from both random generators, restored too)."""
    import copy

    import torch

    from grlm_ray.core.config import BaselineConfig
    from grlm_ray.stages.baselines import train_sasrec

    c = BaselineConfig(loss="sampled", negatives=8, hidden_size=16, num_layers=1, epochs=6, batch_size=64,
                       dropout=0.3, max_len=10, threads=1, validation={"users": 10, "patience": 3})
    seqs = _cyclic_sequences(30)

    def validate(model):  # a deterministic function of the weights
        return {"ndcg_at_10": float(sum(p.double().abs().sum() for p in model.parameters()) % 1), "recall_at_10": 0.0}

    whole = train_sasrec(seqs, 30, c, progress=False, validate=validate)
    saved = {}

    def killed_after_3(state):
        saved.clear()
        saved.update(copy.deepcopy(state))
        if state["epoch"] == 3:
            raise _Killed

    with pytest.raises(_Killed):
        train_sasrec(seqs, 30, c, progress=False, validate=validate, checkpoint=killed_after_3)
    assert saved["epoch"] == 3 and len(saved["losses"]) == 3
    resumed = train_sasrec(seqs, 30, c, progress=False, validate=validate, resume=saved)
    def timeless(curve):
        return [{k: v for k, v in p.items() if k not in ("seconds", "train_minutes")} for p in curve]

    assert resumed.losses == whole.losses and timeless(resumed.curve) == timeless(whole.curve)
    assert resumed.best_epoch == whole.best_epoch
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sasrec_sampled_softmax_masks_a_negative_equal_to_the_positive():
    """Sampled softmax over [positive, shared negatives]: a sampled item equal to a position's positive is
    not counted against it, so with every negative equal to the positive the loss is exactly 0."""
    import numpy as np
    import torch

    from grlm_ray.core.config import BaselineConfig
    from grlm_ray.stages.baselines import _batch_loss, build_sasrec

    c = BaselineConfig(loss="sampled", negatives=5, hidden_size=16, num_layers=1, max_len=4)
    torch.manual_seed(0)
    model = build_sasrec(1, c)  # one item: every sampled negative is item 1
    h = torch.randn(2, 4, 16)
    y = torch.tensor([[0, 1, 1, 1], [1, 1, 0, 1]])
    assert _batch_loss(model, h, y, c, 1, np.random.default_rng(0)).item() == 0.0
    model3 = build_sasrec(3, c)
    loss = _batch_loss(model3, h, torch.tensor([[1, 2, 3, 1]] * 2), c, 3, np.random.default_rng(0))
    assert loss.item() > 0


def test_sasrec_untrained_does_not_know_the_rule():
    from grlm_ray.stages.baselines import build_sasrec, recommend
    from grlm_ray.core.config import BaselineConfig

    import torch

    torch.manual_seed(0)
    model = build_sasrec(30, BaselineConfig(hidden_size=32, num_layers=1, max_len=10)).eval()
    top = recommend(model, [[5, 6, 7], [29, 30], [12], [1, 2], [20]], k=1, max_len=10)
    assert [int(t[0]) for t in top] != [8, 1, 13, 3, 21]


@pytest.mark.parametrize("layers", ["sasrec", "ligr"])
def test_sasrec_positions_see_only_earlier_items(layers):
    """Position j's state depends on items 0..j only: a later item changed leaves it as it was, an earlier one
    does not."""
    import torch

    from grlm_ray.core.config import BaselineConfig
    from grlm_ray.stages.baselines import build_sasrec

    torch.manual_seed(0)
    model = build_sasrec(30, BaselineConfig(layers=layers, hidden_size=16, num_layers=2, num_heads=2,
                                            max_len=6, dropout=0.0)).eval()
    with torch.no_grad():
        a = model(torch.tensor([[0, 0, 3, 4, 5, 6]]))
        later = model(torch.tensor([[0, 0, 3, 4, 5, 9]]))
        earlier = model(torch.tensor([[0, 0, 7, 4, 5, 6]]))
    assert torch.allclose(a[0, 2:5], later[0, 2:5], atol=1e-6) and not torch.allclose(a[0, 5], later[0, 5])
    assert not torch.allclose(a[0, 3:], earlier[0, 3:], atol=1e-4)


@pytest.mark.ray
def test_baseline_stage_scores_the_same_users_as_eval(tmp_path):
    from grlm_ray.core.config import load_config
    from grlm_ray.lib.protocol import select_targets
    from grlm_ray.flows.pipeline import run_pipeline
    from grlm_ray.core.storage import Store

    cfg = load_config(None, [f"run.root={tmp_path}", "data.domains.demo.num_items=120",
                             "data.domains.demo.num_users=300", "ray.progress_bars=false", "eval.limit_users=50",
                             "baseline.epochs=5", "baseline.hidden_size=32", "baseline.num_layers=1",
                             "tracking.enabled=false"])
    info = run_pipeline(cfg, stages=("prepare", "baseline"))["stages"]["baseline"]["info"]
    store = Store(cfg.run.root)
    preds = store.read_table(f"{cfg.run.name}/baseline/predictions.parquet").to_pylist()
    targets = store.read_table(f"{cfg.run.name}/prepare/targets.parquet")
    chosen = select_targets(targets, "test", 50, 0)
    assert [p["user_id"] for p in preds] == [r["user_id"] for r in chosen]
    assert all(len(p["ranked_item_ids"]) == 20 == len(set(p["ranked_item_ids"])) for p in preds)
    assert info["metrics"]["users"] == 50 == info["popularity"]["users"]
    assert info["loss_last"] < info["loss_first"]
    assert "dhr_at_10" not in info["metrics"] and 0 <= info["metrics"]["recall_at_10"] <= 1
    # another set of test users (eval.limit_users changes the stage's hash): the trained model is reused
    again = run_pipeline(cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"limit_users": 30})}),
                         stages=("baseline",))["stages"]["baseline"]["info"]
    assert info["model_cache"] is None and again["model_cache"] and again["metrics"]["users"] == 30
    assert again["losses"] == info["losses"] and again["train_seconds"] == info["train_seconds"]
    # baseline.ensemble=2: seed 0 is the model above (loaded from its cache), seed 1 is trained and cached as
    # a run with baseline.seed=1 would be; the two rank by their mean log-softmax scores
    ens_cfg = load_config(None, [f"run.root={tmp_path}", "data.domains.demo.num_items=120",
                                 "data.domains.demo.num_users=300", "ray.progress_bars=false", "eval.limit_users=50",
                                 "baseline.epochs=5", "baseline.hidden_size=32", "baseline.num_layers=1",
                                 "tracking.enabled=false", "baseline.ensemble=2"])
    ens = run_pipeline(ens_cfg, stages=("baseline",))["stages"]["baseline"]["info"]
    assert [m["seed"] for m in ens["ensemble"]] == [0, 1] and ens["model_cache"] == again["model_cache"]
    assert ens["train_seconds"] == pytest.approx(sum(m["train_seconds"] for m in ens["ensemble"]), abs=0.02)
    assert "ensemble of 2 seeds" in ens["protocol"]["model"] and ens["metrics"]["users"] == 50
    seed1 = run_pipeline(load_config(None, [f"run.root={tmp_path}", "data.domains.demo.num_items=120",
                                            "data.domains.demo.num_users=300", "ray.progress_bars=false",
                                            "eval.limit_users=50", "baseline.epochs=5", "baseline.hidden_size=32",
                                            "baseline.num_layers=1", "tracking.enabled=false", "baseline.seed=1"]),
                         stages=("baseline",))["stages"]["baseline"]["info"]
    assert seed1["model_cache"] and seed1["losses"] != info["losses"]  # the ensemble's seed-1 member, reused


def test_an_ensemble_of_sasrecs_ranks_by_their_mean_log_softmax():
    import torch

    from grlm_ray.core.config import BaselineConfig
    from grlm_ray.stages.baselines import _pad_left, recommend, train_sasrec

    n, hist = 30, [[5, 6, 7], [29, 30], [12], [3, 9, 27]]
    models = [train_sasrec(_cyclic_sequences(n), n, BaselineConfig(hidden_size=16, num_layers=1, epochs=3, seed=s,
                                                                   batch_size=64, dropout=0.0, max_len=10, threads=1),
                           progress=False).model for s in (0, 1)]
    one = recommend(models[0], hist, k=8, max_len=10)
    assert (recommend([models[0], models[0]], hist, k=8, max_len=10) == one).all()
    x = torch.from_numpy(_pad_left(hist, 10))
    with torch.inference_mode():
        mean = torch.stack([torch.log_softmax(m.scores(m(x)[:, -1]), -1) for m in models]).mean(0)
    both = recommend(models, hist, k=8, max_len=10)
    assert (both == torch.topk(mean, 8, -1).indices.numpy()).all() and not (both == one).all()
