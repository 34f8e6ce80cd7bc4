"""The label-positions loss (train.selective_logits) is the model's own loss, value and gradients."""

import pytest


@pytest.mark.parametrize("packed", [False, True])
def test_label_positions_loss_equals_the_models_own_loss_and_gradients(packed):
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    from grlm_ray.stages.train import label_positions_lm
    from grlm_ray.lib.tokens import IGNORE, bucket, collate, pack

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=16, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.config.use_cache = False
    ids = [[int(x) for x in torch.randint(1, 50, (n,))] for n in (7, 12, 5, 9)]
    labels = [[IGNORE] * (len(x) // 2) + x[len(x) // 2:] for x in ids]
    batches = pack(ids, labels, 32, 0) if packed else bucket(ids, labels, 32, 4)
    batch = collate(batches.table.to_pylist(), packed, 0)
    ref = model(**batch).loss
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    out = label_positions_lm(model)(**batch).loss
    out.backward()
    assert out.item() == pytest.approx(ref.item(), rel=1e-5)
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, ref_grads[n], atol=1e-6), n


def test_residual_dropout_acts_in_training_only_and_leaves_the_saved_model_plain(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    from grlm_ray.stages.train import add_residual_dropout

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=16)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    ids = torch.randint(0, 50, (2, 9))
    model.eval()
    before = model(input_ids=ids).logits
    assert add_residual_dropout(model, 0.3) == 1 + 2 * 2
    assert torch.equal(model(input_ids=ids).logits, before)  # eval: no dropout
    model.train()
    a, b = model(input_ids=ids).logits, model(input_ids=ids).logits
    assert not torch.allclose(a, b)  # training: two passes differ
    model.save_pretrained(tmp_path)
    model.eval()
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.allclose(again(input_ids=ids).logits, before, atol=1e-6)


def test_weight_average_follows_the_decay_swaps_in_and_out_and_exports_through_tied_embeddings(tmp_path):
    """train.ema_decay: the average after n updates is the warmed-up exponential average of the weights;
    ``applied`` scores with it and restores the trained weights; a checkpoint's ema.pt becomes the exported
    model, including the tied output layer (a stale lm_head copy must not overwrite the averaged embedding)."""
    import json

    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    from grlm_ray.core.errors import ConfigError
    from grlm_ray.stages.train import EMA_FILE, WeightEMA, export_model

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=16, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    w = model.model.embed_tokens.weight
    expected = w.detach().clone()
    ema = WeightEMA(model, 0.9)
    for n in range(1, 6):
        with torch.no_grad():
            w.add_(1.0)
        ema.update(model)
        d = min(0.9, (1 + n) / (10 + n))
        expected = d * expected + (1 - d) * w.detach()
    assert torch.allclose(ema.shadow["model.embed_tokens.weight"], expected, atol=1e-5)
    trained = w.detach().clone()
    with ema.applied(model) as m:
        assert torch.allclose(m.lm_head.weight, expected, atol=1e-5)  # tied: the output layer is averaged too
    assert torch.equal(w, trained)
    # a checkpoint with the raw weights (lm_head included, as DDP saves them) and the average: export = average
    base, ckpt, out = tmp_path / "base", tmp_path / "ckpt", tmp_path / "out"
    model.save_pretrained(base)
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>"))
                            ).save_pretrained(base)
    ckpt.mkdir()
    torch.save(model.state_dict(), ckpt / "model.pt")
    torch.save(ema.state_dict(), ckpt / EMA_FILE)
    (ckpt / "meta.json").write_text(json.dumps({"strategy": "ddp"}))
    export_model(str(ckpt), str(base), str(out), {})
    exported = AutoModelForCausalLM.from_pretrained(out)
    assert torch.allclose(exported.model.embed_tokens.weight, expected, atol=1e-5)
    assert torch.allclose(exported.lm_head.weight, expected, atol=1e-5)
    deeper = Qwen3Config(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=16, tie_word_embeddings=True)
    other = WeightEMA(AutoModelForCausalLM.from_config(deeper), 0.9)
    with pytest.raises(ConfigError, match="weight average does not match"):
        other.load_state_dict(ema.state_dict())


def test_embedder_init_gives_related_words_related_embeddings_and_keeps_special_tokens_random():
    """model.embed_init=embedder with the shipped MiniLM: token embeddings start from the words' meaning
    (shampoo nearer conditioner than drill), at the random init's spread; special tokens are untouched."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen3Config

    from grlm_ray.core.config import EmbedConfig
    from grlm_ray.stages.train import embedder_init

    words = ["shampoo", "conditioner", "hair", "drill", "hammer", "screwdriver", "lipstick", "mascara", "eyeliner",
             "tent", "backpack", "sleeping", "puzzle", "doll", "lego", "soap", "lotion", "moisturizer", "wrench",
             "saw", "blocks", "toy", "cream", "serum"]
    vocab = {"<pad>": 0, **{w: i + 1 for i, w in enumerate(words)}}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>")
    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=8, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    before = model.get_input_embeddings().weight.detach().clone()
    info = embedder_init(model, tok, EmbedConfig().model)
    w = model.get_input_embeddings().weight.detach()
    assert info["embedded_tokens"] == len(words) and info["components"] == 16
    assert torch.equal(w[0], before[0])  # the special (pad) token keeps its random init
    assert torch.equal(model.lm_head.weight, model.get_input_embeddings().weight)  # tied
    assert abs(float(w[1:].std()) / float(before.std()) - 1) < 0.2

    def cos(a, b):
        return float(torch.nn.functional.cosine_similarity(w[vocab[a]], w[vocab[b]], dim=0))

    assert cos("shampoo", "conditioner") > cos("shampoo", "drill")
    assert cos("hammer", "wrench") > cos("hammer", "lipstick")


def test_a_long_training_prints_a_progress_line_at_least_every_few_minutes(monkeypatch, capsys):
    """About 5 console lines per training, and one at least every Progress.CONSOLE_S seconds of a long one
    (a 2-hour job otherwise went 25 minutes without a word)."""
    from types import SimpleNamespace

    from grlm_ray.stages.train import recipe

    clock = [0.0]
    monkeypatch.setattr(recipe.time, "time", lambda: clock[0])
    lc = SimpleNamespace(train=SimpleNamespace(log_every=10), plan={"total_steps": 1000}, verbose=False, mlflow=None)

    def lines(seconds_per_window: float) -> list[int]:
        p = recipe.Progress(lc, rank=0, world=2)
        capsys.readouterr()
        for done in range(10, 1001, 10):
            clock[0] += seconds_per_window
            p.count(100, 4)
            p.window(done, 1, {"loss": 1.0, "lr": 1e-3})
        return [int(x.split()[2].split("/")[0]) for x in capsys.readouterr().out.splitlines()]

    assert lines(1.0) == [200, 400, 600, 800, 1000]  # a short training: about 5 lines
    slow = lines(100.0)  # 100 s a window: a line every 3 windows (300 s) as well
    assert slow[:4] == [30, 60, 90, 120] and {200, 400, 1000} <= set(slow)
    assert all(b - a <= 30 for a, b in zip(slow, slow[1:]))


def test_training_tokens_at_a_step_are_the_real_tokens_of_the_rows_trained_so_far():
    """Validation points carry the training tokens so far (curves compare trainings at equal tokens): exact, every
    rank's rows, across epochs (the seeded order drops the rows past the last whole step)."""
    from types import SimpleNamespace

    from grlm_ray.stages.train import recipe

    r = object.__new__(recipe.Recipe)
    r.data = [{"length": n, "samples": 1} for n in range(1, 12)]  # 11 rows: 8 a epoch (2 steps x 4 rows)
    r.t = SimpleNamespace(seed=3, micro_batch=2)
    r.lc = SimpleNamespace(packed=False, plan={"steps_per_epoch": 2, "rows_per_step": 4})
    trained = []
    for step in range(5):
        epoch, pos = divmod(step, 2)
        trained += [r.data[i]["length"] for i in r.order(epoch)[pos * 4:(pos + 1) * 4]]
        assert r.tokens_through(step + 1) == sum(trained)
    assert r.tokens_through(0) == 0 and r.tokens_through(2) < sum(range(1, 12))  # 3 rows left out of epoch 0
