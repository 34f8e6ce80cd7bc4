"""Run storage: atomic writes, manifests, skip / resume / redo — on local disk and a real S3 server."""

import os

import pyarrow as pa
import pytest

from grlm_ray.core.config import S3Config, load_config
from grlm_ray.stages.prepare import prepare
from grlm_ray.core.schemas import ITEMS
from grlm_ray.lib.stats import dataset_stats
from grlm_ray.core.storage import Store, copy_stages, mark_redo, read_manifest, run_stage


def parts_stage(keys, fail_at=None, calls=None):
    """A stage that writes one part per key and can be made to die half-way."""

    def body(ctx):
        for k in keys:
            if ctx.part_done(k):
                continue
            if k == fail_at:
                raise RuntimeError(f"killed at {k}")
            (calls if calls is not None else []).append(k)
            ctx.write_part(k, {"t.parquet": (pa.table({"k": [k]}), None)})
        merged = pa.concat_tables([ctx.read_part(k, "t.parquet") for k in keys])
        ctx.write("all.parquet", merged)

    return body


def exercise_store(store: Store):
    calls: list[str] = []
    with pytest.raises(RuntimeError, match="killed at c"):
        run_stage(store, "r", "s", "h1", parts_stage("abcd", fail_at="c", calls=calls))
    assert read_manifest(store, "r", "s")["status"] == "running"
    assert calls == ["a", "b"]
    m = run_stage(store, "r", "s", "h1", parts_stage("abcd", calls=calls))  # resumes: only c, d run
    assert calls == ["a", "b", "c", "d"] and m["status"] == "complete" and not m["skipped"]
    assert store.read_table("r/s/all.parquet").column("k").to_pylist() == list("abcd")
    m2 = run_stage(store, "r", "s", "h1", parts_stage("abcd", calls=calls))  # complete: skipped
    assert m2["skipped"] and calls == list("abcd")
    run_stage(store, "r", "s", "h2", parts_stage("abcd", calls=calls))  # config changed: redone
    assert calls == list("abcd") * 2


def test_local_store_skip_resume_redo(tmp_path):
    exercise_store(Store(str(tmp_path / "root")))


def test_local_writes_are_atomic_and_leave_no_temp_files(tmp_path):
    store = Store(str(tmp_path))
    store.write_table("x/items.parquet", ITEMS.arrow.empty_table(), ITEMS)
    store.write_json("x/m.json", {"a": 1})
    assert sorted(os.listdir(tmp_path / "x")) == ["items.parquet", "m.json"]
    with pytest.raises(Exception):
        store.write_table("x/items.parquet", pa.table({"item_id": ["1"]}), ITEMS)  # invalid: not written
    assert store.read_table("x/items.parquet").num_rows == 0
    assert sorted(os.listdir(tmp_path / "x")) == ["items.parquet", "m.json"]


@pytest.mark.services
def test_s3_round_trip_resume_and_prepare(s3_server):
    s3 = S3Config(endpoint_url=s3_server["endpoint"])
    store = Store(f"s3://{s3_server['bucket']}/unit", s3)
    exercise_store(store)
    exercise_batches(store)
    keys = s3_server["client"].list_objects_v2(Bucket=s3_server["bucket"], Prefix="unit/r/s/")
    names = {o["Key"] for o in keys.get("Contents", [])}
    assert "unit/r/s/_manifest.json" in names and "unit/r/s/all.parquet" in names

    cfg = load_config(None, [f"run.root=s3://{s3_server['bucket']}/runs", f"run.s3.endpoint_url={s3_server['endpoint']}",
                             "data.domains.demo.num_items=200", "data.domains.demo.num_users=400"])
    first = prepare(cfg)
    again = prepare(cfg)
    assert not first["skipped"] and again["skipped"]
    stats = dataset_stats(f"s3://{s3_server['bucket']}/runs/demo/prepare", s3)
    assert stats["users"] == first["outputs"]["sequences.parquet"]
    assert stats["items"] == first["outputs"]["items.parquet"]


@pytest.mark.services
def test_a_model_on_s3_is_downloaded_again_when_its_stage_ran_again(s3_server, tmp_path):
    """``Run.local_dir`` from an S3 root: the download is reused while the stage's manifest is the same and made
    again once the stage has run again (a retrained model is never served from a stale copy)."""
    from grlm_ray.core.run import Run

    cfg = load_config(None, [f"run.root=s3://{s3_server['bucket']}/versioned",
                             f"run.s3.endpoint_url={s3_server['endpoint']}", "run.name=v"])
    run = Run.of(cfg)

    def train(weights: bytes):
        return lambda ctx: ctx.store.write_bytes(ctx.rel("model/w.bin"), weights)

    run_stage(run.store, "v", "train", "k1", train(b"first"))
    one = run.local_dir("train", "model", str(tmp_path))
    assert open(f"{one}/w.bin", "rb").read() == b"first" and run.local_dir("train", "model", str(tmp_path)) == one
    run_stage(run.store, "v", "train", "k2", train(b"second"))  # retrained (another key)
    two = run.local_dir("train", "model", str(tmp_path))
    assert two != one and open(f"{two}/w.bin", "rb").read() == b"second"
    mark_redo(run.store, "v", "train")  # the same key, run again
    run_stage(run.store, "v", "train", "k2", train(b"third"))
    assert open(f"{run.local_dir('train', 'model', str(tmp_path))}/w.bin", "rb").read() == b"third"


def test_copy_stages_shares_finished_stages_and_replaces_stale_copies(tmp_path):
    store = Store(str(tmp_path))

    def write(value):
        return lambda ctx: ctx.write("t.parquet", pa.table({"v": [value]}))

    run_stage(store, "base", "a", "h1", write(1))
    with pytest.raises(RuntimeError):
        run_stage(store, "base", "b", "h1", lambda ctx: (_ for _ in ()).throw(RuntimeError("half-done")))
    assert copy_stages(store, "base", "var", ("a", "b")) == ["a"]  # a half-done stage is not shared
    assert read_manifest(store, "var", "a")["config_hash"] == "h1"
    assert store.read_table("var/a/t.parquet").column("v").to_pylist() == [1]
    assert copy_stages(store, "base", "var", ("a",)) == []  # the same copy is kept
    run_stage(store, "base", "a", "h2", write(2))  # the base redoes the stage
    assert copy_stages(store, "base", "var", ("a",)) == ["a"]
    assert store.read_table("var/a/t.parquet").column("v").to_pylist() == [2]
    assert not store.exists("var/b")



def test_chained_keys_rerun_downstream_only(tmp_path):
    store = Store(str(tmp_path / "root"))
    calls: list[str] = []

    def stage(name: str):
        def body(ctx):
            calls.append(name)
            ctx.write("x.parquet", pa.table({"k": [name]}))
        return body

    def chain(a: str, b: str, c: str) -> None:  # a <- b <- c, each with its own config hash
        run_stage(store, "r", "a", a, stage("a"))
        run_stage(store, "r", "b", b, stage("b"), after=("a",))
        run_stage(store, "r", "c", c, stage("c"), after=("b",))

    chain("1", "1", "1")
    chain("1", "1", "1")
    assert calls == ["a", "b", "c"]  # the second pass skipped everything
    chain("1", "1", "2")
    assert calls[3:] == ["c"]  # only the changed stage
    chain("2", "1", "2")
    assert calls[4:] == ["a", "b", "c"]  # a change upstream reaches every stage downstream
    assert read_manifest(store, "r", "c")["upstream"] == {"b": read_manifest(store, "r", "b")["config_hash"]}
    # a redo (grlm <stage> --redo): that stage and everything after it run again, nothing before it
    from grlm_ray.core.storage import mark_redo

    assert mark_redo(store, "r", "b") and not mark_redo(store, "r", "zz")
    chain("2", "1", "2")
    assert calls[7:] == ["b", "c"]
    chain("2", "1", "2")
    assert calls[9:] == []  # done again: skipped again
    assert read_manifest(store, "r", "b")["generation"] == 1 and "generation" not in read_manifest(store, "r", "c")
    mark_redo(store, "r", "c")  # the last stage: only itself
    chain("2", "1", "2")
    assert calls[9:] == ["c"] and read_manifest(store, "r", "c")["generation"] == 1


def test_a_half_done_stage_is_not_started_over_by_a_changed_config(tmp_path):
    """A killed job resubmitted with an edited config would clear its half-done training: refused before any
    work, naming the changed fields; the same config, a change only downstream, or run.resume=false go on."""
    from grlm_ray.core.registry import key_sections, stage_key, upstream
    from grlm_ray.flows.pipeline import check_inputs, half_done_conflicts, save_resolved_config

    base = [f"run.root={tmp_path}", "run.name=r", "sft.terms=provided"]
    cfg = load_config(None, base)
    store = Store(str(tmp_path))
    save_resolved_config(cfg)
    for s in upstream("train", cfg):
        store.write_json(f"r/{s}/_manifest.json", {"config_hash": stage_key(cfg, s) + "-abc",
                                                 "status": "running" if s == "train" else "complete"})
    stages = upstream("eval", cfg)
    assert half_done_conflicts(cfg, stages) == []
    assert half_done_conflicts(load_config(None, [*base, "eval.num_beams=7"]), stages) == []  # downstream only
    lr = load_config(None, [*base, "train.learning_rate=0.002"])
    (msg,) = half_done_conflicts(lr, stages)
    assert "stage 'train' stopped half-way" in msg and "train.learning_rate: 0.001 -> 0.002" in msg
    assert "run.resume=false" in msg and "`grlm train CONFIG --redo`" in msg and msg in check_inputs(lr, stages)
    up = load_config(None, [*base, "data.max_sequence_length=10"])  # upstream of train: it would be cleared too
    (msg,) = half_done_conflicts(up, stages)
    assert "for prepare" in msg and "data.max_sequence_length: None -> 10" in msg
    assert half_done_conflicts(load_config(None, [*base, "train.learning_rate=0.002", "run.resume=false"]), stages) == []
    # the same config, keyed otherwise (another machine's precision, another version): said so, not a bare refusal
    store.write_json("r/train/_manifest.json", {"config_hash": "0123456789abcdef-abc", "status": "running"})
    (msg,) = half_done_conflicts(cfg, stages)
    assert "no field differs" in msg and "train.precision=auto" in msg
    store.write_json("r/train/_manifest.json", {"config_hash": stage_key(cfg, "train"), "status": "complete"})
    assert half_done_conflicts(lr, stages) == []  # a finished stage re-runs under a new config, as always
    # the fields come from what the stage ran with (its manifest), not from a config.yaml a later call of the same
    # run (another stage of a benchmark) has already overwritten with the new config
    keyed = lambda c, s: {sec: c.model_dump(mode="json")[sec] for sec in key_sections(c, s)}  # noqa: E731
    store.write_json("r/train/_manifest.json", {"config_hash": stage_key(cfg, "train") + "-abc", "status": "running",
                                              "config": keyed(cfg, "train")})
    save_resolved_config(lr)
    (msg,) = half_done_conflicts(lr, stages)
    assert "train.learning_rate: 0.001 -> 0.002" in msg and "no field differs" not in msg
    # train.precision=auto: the manifest holds what it resolved to on this machine (the train stage records the
    # resolved config), the resubmission says auto: not a difference, only the field the user changed is named
    from grlm_ray.stages.train.schedule import resolved

    auto = load_config(None, [*base, "train.precision=auto"])
    store.write_json("r/train/_manifest.json", {"config_hash": "0123456789abcdef-abc", "status": "running",
                                              "config": keyed(resolved(auto), "train")})
    (msg,) = half_done_conflicts(load_config(None, [*base, "train.precision=auto", "train.learning_rate=0.002"]),
                                 stages)
    assert "train.learning_rate: 0.001 -> 0.002" in msg and "precision" not in msg.split("(")[1].split(")")[0]
    # and the stages record it: a manifest written by Run.run_stage holds its key's sections
    from grlm_ray.core.run import Run

    Run.of(cfg).run_stage("prepare", lambda ctx: None)
    assert store.read_json("r/prepare/_manifest.json")["config"] == keyed(cfg, "prepare")


def test_a_finished_stage_a_config_will_redo_is_named_with_the_fields_before_it_runs(tmp_path):
    """The same data folder written another way (``../x`` for ``/abs/x``) keys prepare anew, and every stage after
    it is done again: said before anything runs, with the field; nothing said for the config the run finished."""
    from grlm_ray.core.registry import stage_key, upstream
    from grlm_ray.flows.pipeline import finished_redos, save_resolved_config

    base = [f"run.root={tmp_path}", "run.name=r", "sft.terms=provided", f"data.base_dir={tmp_path}/data"]
    cfg = load_config(None, base)
    store = Store(str(tmp_path))
    save_resolved_config(cfg)
    for s in upstream("train", cfg):
        store.write_json(f"r/{s}/_manifest.json", {"config_hash": stage_key(cfg, s) + "-abc", "status": "complete"})
    stages = upstream("eval", cfg)
    assert finished_redos(cfg, stages) == []
    assert finished_redos(load_config(None, [*base, "eval.num_beams=7"]), stages) == []  # eval never finished
    other = load_config(None, [*base[:-1], f"data.base_dir={tmp_path}/../{tmp_path.name}/data"])
    (msg,) = finished_redos(other, stages)
    assert "stage 'prepare' is complete for another config and will be done again" in msg
    assert f"data.base_dir: '{tmp_path}/data' -> '{tmp_path}/../{tmp_path.name}/data'" in msg
    (msg,) = finished_redos(load_config(None, [*base, "train.learning_rate=0.002"]), stages)
    assert "stage 'train'" in msg and "train.learning_rate: 0.001 -> 0.002" in msg
    assert finished_redos(load_config(None, [*base, "train.learning_rate=0.002", "run.resume=false"]), stages) == []


def test_stage_graph_upstream_closure():
    from grlm_ray.flows.pipeline import reads, upstream

    cfg = load_config(None, [])
    assert upstream("eval", cfg) == ("prepare", "embed", "neighbors", "ctg", "sft", "train", "eval")
    assert upstream("baseline", cfg) == ("prepare", "baseline")
    provided = load_config(None, ["sft.terms=provided"])
    assert upstream("train", provided) == ("prepare", "sft", "train") and reads("sft", provided) == ("prepare",)
    comp = load_config(None, ["sft.terms=compress", "sft.compress_k=64"])
    assert upstream("sft", comp) == ("prepare", "embed", "neighbors", "ctg", "compress", "sft")


def test_embeddings_stream_into_the_matrix_read_table_gives_and_bad_rows_are_named(tmp_path):
    import numpy as np

    from grlm_ray.core.errors import DataError
    from grlm_ray.core.schemas import EMBEDDINGS, embedding_matrix

    store = Store(str(tmp_path))
    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((23, 8)).astype(np.float32)
    table = pa.table({"item_id": [f"i{k}" for k in range(23)],
                      "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vecs.ravel()), 8)})
    store.write_table("r/embed/embeddings.parquet", table, EMBEDDINGS)
    ids, base = store.read_embeddings("r/embed/embeddings.parquet", batch_rows=5)  # several batches
    want = store.read_table("r/embed/embeddings.parquet", EMBEDDINGS)
    assert ids.to_pylist() == want.column("item_id").to_pylist()
    assert base.dtype == np.float32 and np.array_equal(base, embedding_matrix(want))
    short = pa.table({"item_id": ["a", "b", "c"], "embedding": pa.array([[1.0, 2.0], [1.0, 2.0], [1.0]],
                                                                         pa.list_(pa.float32()))})
    store.write_table("r/bad1.parquet", short)
    with pytest.raises(DataError, match="not 2 long") as e:
        store.read_embeddings("r/bad1.parquet", batch_rows=2)
    assert e.value.row == 2 and e.value.field == "embedding"
    store.write_table("r/bad2.parquet", pa.table({"item_id": ["a", "b", "a"], "embedding": short.column(1)}))
    with pytest.raises(DataError, match="duplicate item id 'a'") as e:
        store.read_embeddings("r/bad2.parquet")
    assert e.value.row == 2


def sft_rows(tasks):
    from grlm_ray.core.schemas import SFT

    return pa.Table.from_pylist([{"task": t, "domain": "d", "prompt": [{"role": "user", "content": f"q{k}"}],
                                  "completion": f" a{k} |"} for k, t in enumerate(tasks)], schema=SFT.arrow)


def exercise_batches(store: Store):
    """Tables streamed into one artifact and out of it a batch at a time: the same rows as the whole-table
    calls, atomic on failure, and a bad row named by its row in the file."""
    from grlm_ray.core.errors import DataError
    from grlm_ray.core.schemas import SFT

    parts = [sft_rows(["seq"] * n) for n in (3, 0, 4)]
    assert store.write_batches("b/sft.parquet", iter(parts), SFT) == 7
    whole = store.read_table("b/sft.parquet", SFT)
    assert whole.equals(pa.concat_tables(parts))
    got = list(store.read_batches("b/sft.parquet", SFT, batch_rows=2))
    assert [t.num_rows for t in got] == [2, 2, 2, 1] and pa.concat_tables(got).equals(whole)
    only = pa.concat_tables(store.read_batches("b/sft.parquet", SFT, columns=["completion"], batch_rows=3))
    assert only.column_names == ["completion"] and only.column(0).equals(whole.column("completion"))
    assert store.read_table("b/sft.parquet", SFT, columns=["completion", "task"]).equals(
        whole.select(["task", "completion"]))  # the columns asked for, in the contract's order
    with pytest.raises(DataError, match="missing column") as e:
        store.read_table("b/sft.parquet", SFT, columns=["task", "nope"])
    assert e.value.field == "nope"

    def dies():
        yield sft_rows(["gti"])
        raise RuntimeError("killed while writing")

    with pytest.raises(RuntimeError, match="killed while writing"):
        store.write_batches("b/sft.parquet", dies(), SFT)  # the old file stays whole
    assert store.read_table("b/sft.parquet", SFT).equals(whole)
    with pytest.raises(DataError, match="empty value") as e:
        store.write_batches("b/bad.parquet", iter([sft_rows(["seq"]), sft_rows(["seq", ""])]), SFT)
    assert "(writing)" in str(e.value) and e.value.row == 2 and not store.exists("b/bad.parquet")
    store.write_table("b/bad.parquet", sft_rows(["seq", "seq", "seq", ""]))  # unchecked on write
    with pytest.raises(DataError, match="empty value") as e:
        list(store.read_batches("b/bad.parquet", SFT, batch_rows=2))
    assert e.value.row == 3 and e.value.field == "task"
    with pytest.raises(DataError, match="missing column") as e:
        next(store.read_batches("b/sft.parquet", SFT, columns=["task", "nope"]))
    assert e.value.field == "nope"
    store.write_table("b/bad.parquet", whole.drop(["completion"]))
    with pytest.raises(DataError, match="missing column") as e:
        next(store.read_batches("b/bad.parquet", SFT))
    assert e.value.field == "completion"


def test_local_batches_stream_in_and_out_atomically_and_name_the_files_row(tmp_path):
    store = Store(str(tmp_path))
    exercise_batches(store)
    assert sorted(os.listdir(tmp_path / "b")) == ["bad.parquet", "sft.parquet"]  # no temporary files left


def test_stored_checkpoints_lists_only_folders_every_rank_finished(tmp_path):
    """A job stopped mid-upload leaves partial checkpoint folders: only those whose every rank's file list is
    there with each file at its size are resumed from (Ray Train's own record may lag the upload)."""
    import json

    from grlm_ray.stages.train import seal_checkpoint, stored_checkpoints

    store, rel = Store(str(tmp_path)), "run/train/ray/job"

    def checkpoint(name, step, world, ranks, truncate=None):
        for r in ranks:
            local = tmp_path / f"local-{name}-{r}"
            local.mkdir()
            (local / f"rng_rank{r}.pt").write_bytes(b"x" * (10 + r))
            if r == 0:
                (local / "model.pt").write_bytes(b"w" * 100)
                (local / "meta.json").write_text(json.dumps({"step": step, "world": world}))
            seal_checkpoint(str(local), r)
            for f in local.iterdir():
                data = f.read_bytes()
                store.write_bytes(f"{rel}/{name}/{f.name}", data[:-1] if f.name == truncate else data)

    checkpoint("checkpoint_a", 10, 2, [0, 1])
    checkpoint("checkpoint_b", 20, 2, [0, 1])
    checkpoint("checkpoint_c", 30, 2, [0])  # rank 1 never uploaded
    checkpoint("checkpoint_d", 40, 2, [0, 1], truncate="model.pt")  # a file cut short
    store.write_bytes(f"{rel}/checkpoint_e/meta.json", json.dumps({"step": 50}).encode())  # before the seal
    assert stored_checkpoints(store, rel) == [(10, f"{rel}/checkpoint_a"), (20, f"{rel}/checkpoint_b")]
    assert stored_checkpoints(store, "run/none") == []


def test_status_reports_each_stage_and_how_far_an_unfinished_training_got(tmp_path, capsys):
    """`grlm status`: from the run's store alone, complete / stale / unfinished / not run per stage, and for an
    unfinished training its newest *complete* checkpoint (a folder whose files are not all there is skipped)."""
    import json

    from grlm_ray.cli import main
    from grlm_ray.core.registry import stage_key
    from grlm_ray.flows.status import run_status

    base = [f"run.root={tmp_path}", "run.name=r", "sft.terms=provided"]
    cfg = load_config(None, base)
    store = Store(str(tmp_path))
    store.write_json("r/prepare/_manifest.json", {"status": "complete", "config_hash": stage_key(cfg, "prepare"),
                                                  "seconds": 3.0, "finished_at": 0})
    store.write_json("r/sft/_manifest.json", {"status": "complete", "config_hash": "0" * 16, "seconds": 1.0})
    store.write_json("r/train/_manifest.json", {"status": "running", "config_hash": stage_key(cfg, "train")})

    def checkpoint(step: int, sealed_size_off: int = 0) -> None:
        d = tmp_path / "r" / "train" / "ray" / "r-train-1" / f"checkpoint_{step:06d}"
        d.mkdir(parents=True)
        (d / "model.pt").write_bytes(b"x" * 10)
        meta = {"step": step, "world": 1, "total_steps": 100, "train_seconds": 6.0 * step,
                "validation": {"points": [{"step": 40, "recall_at_10": 0.1, "ndcg_at_10": 0.05}], "best": 0.05,
                               "best_step": 40}}
        (d / "meta.json").write_text(json.dumps(meta))
        (d / "files_rank0.json").write_text(json.dumps({"model.pt": 10 + sealed_size_off,
                                                        "meta.json": (d / "meta.json").stat().st_size}))

    rows = {r["stage"]: r for r in run_status(cfg)}
    assert rows["train"]["state"] == "unfinished" and rows["train"]["checkpoint"] is None
    checkpoint(40)
    checkpoint(60, sealed_size_off=5)  # a rank's upload cut short: not complete
    rows = {r["stage"]: r for r in run_status(cfg)}
    assert rows["prepare"]["state"] == "complete" and rows["sft"]["state"] == "stale"
    assert rows["eval"]["state"] == "not run" and "members" not in rows  # one model: no members stage to show
    assert {r["stage"]: r for r in run_status(load_config(None, [*base, "train.members=2"]))}["members"]["state"] == \
        "not run"
    t = rows["train"]
    assert t["checkpoint_step"] == 40 and t["total_steps"] == 100 and t["train_minutes"] == 4.0
    assert t["last_validation"]["recall_at_10"] == 0.1 and t["best_validation"] == {"step": 40, "value": 0.05}
    assert main(["status", "configs/demo.yaml", *base]) == 0
    out = capsys.readouterr().out
    assert "checkpoint at step 40 of 100, 4.0 training minutes" in out and "the next run redoes it" in out
