"""Tokenization for IIFT: chat-rendered prompts with masked labels, sequence packing, length bucketing.

- A sample is ``prompt_ids + completion_ids``; labels are -100 on every prompt token, so the loss is on
  the completion (the answer and its end-of-turn token) only.
- Packing puts several samples in one row of ``block_size`` tokens (first-fit decreasing). Position ids
  restart at 0 for every sample; the model then builds a block-diagonal causal mask from them
  (transformers: packed sequences are detected from position ids when no attention mask is given), so a
  sample never attends to another. The padding tail of a row is its own segment with labels -100.
- Without packing, samples are sorted by length and cut into micro batches (length bucketing), padded on
  the right with an attention mask. Both report their padding waste.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa

from grlm_ray.lib.generation import render

IGNORE = -100


def render_prompt(tokenizer: Any, messages: list[dict[str, str]], enable_thinking: bool = False, prefix: str = "") -> str:
    """The chat-template text the model sees before it writes; identical at training, eval and serving."""

    return render(tokenizer, messages, prefix, enable_thinking)


def end_of_turn(tokenizer: Any) -> str:
    return tokenizer.eos_token or ""


def encode_sample(tokenizer: Any, messages: list[dict[str, str]], completion: str,
                  enable_thinking: bool = False) -> tuple[list[int], list[int]]:
    """(input_ids, labels) with labels -100 exactly on the prompt tokens."""
    ids, labels = encode_all(tokenizer, [messages], [completion], enable_thinking)
    return ids[0], labels[0]


def encode_all(tokenizer: Any, prompts: Sequence[list[dict[str, str]]], completions: Sequence[str],
               enable_thinking: bool = False, batch: int = 2048,
               unlabeled: Callable[[str, str], list[tuple[int, int]]] | None = None,
               tasks: Sequence[str] | None = None) -> tuple[list[list[int]], list[list[int]]]:
    """Batched ``encode_sample`` (fast tokenizers encode a list at once). ``unlabeled`` (task, completion) ->
    sorted disjoint character spans (``textformat.unlabeled_spans``): completion tokens that start inside one
    get label -100 too: read, never predicted. ``tasks``: each sample's task (default ``seq``)."""

    ids_out: list[list[int]] = []
    labels_out: list[list[int]] = []
    eot = end_of_turn(tokenizer)
    for s in range(0, len(prompts), batch):
        ptexts = [render_prompt(tokenizer, m, enable_thinking) for m in prompts[s:s + batch]]
        ctexts = [c + eot for c in completions[s:s + batch]]
        penc = tokenizer(ptexts, add_special_tokens=False)["input_ids"]
        cenc = tokenizer(ctexts, add_special_tokens=False, return_offsets_mapping=unlabeled is not None)
        for j, (p, c) in enumerate(zip(penc, cenc["input_ids"])):
            lab = list(c)
            spans = unlabeled(tasks[s + j] if tasks is not None else "seq", completions[s + j]) if unlabeled else None
            if spans:
                starts = np.array([a for a, _ in spans])
                ends = np.array([b for _, b in spans])
                for n, (a, _) in enumerate(cenc["offset_mapping"][j]):
                    k = np.searchsorted(starts, a, side="right") - 1
                    if k >= 0 and a < ends[k]:
                        lab[n] = IGNORE
            ids_out.append(list(p) + list(c))
            labels_out.append([IGNORE] * len(p) + lab)
    return ids_out, labels_out


@dataclass
class Batches:
    """Token rows ready for training, and what building them cost."""

    table: pa.Table | None  # input_ids, labels, position_ids (list<int32>), samples, length (int32); None: written
    packed: bool
    stats: dict[str, Any]


def pack(ids: list[list[int]], labels: list[list[int]], block_size: int, pad_id: int) -> Batches:
    """First-fit decreasing into rows of ``block_size``; samples longer than a row are cut (counted)."""
    lengths = np.array([min(len(x), block_size) for x in ids])
    order = np.argsort(-lengths, kind="stable")
    rows: list[list[int]] = []
    free = np.zeros(max(1, len(ids)), dtype=np.int64)  # free slots per row (first len(rows) in use)
    for j in order:
        n = int(lengths[j])
        fits = np.flatnonzero(free[: len(rows)] >= n)
        if fits.size:  # first fit (vectorized scan over the open rows)
            r = int(fits[0])
            rows[r].append(int(j))
            free[r] -= n
        else:
            rows.append([int(j)])
            free[len(rows) - 1] = block_size - n
    col_ids, col_labels, col_pos, col_n, col_len = [], [], [], [], []
    real = 0
    for members in rows:
        r_ids: list[int] = []
        r_lab: list[int] = []
        r_pos: list[int] = []
        for j in members:
            n = int(lengths[j])
            r_ids += ids[j][:n]
            r_lab += labels[j][:n]
            r_pos += list(range(n))
        real += len(r_ids)
        col_len.append(len(r_ids))
        pad = block_size - len(r_ids)
        r_ids += [pad_id] * pad
        r_lab += [IGNORE] * pad
        r_pos += list(range(pad))  # its own segment
        col_ids.append(r_ids)
        col_labels.append(r_lab)
        col_pos.append(r_pos)
        col_n.append(len(members))
    table = pa.table({
        "input_ids": pa.array(col_ids, pa.list_(pa.int32())),
        "labels": pa.array(col_labels, pa.list_(pa.int32())),
        "position_ids": pa.array(col_pos, pa.list_(pa.int32())),
        "samples": pa.array(col_n, pa.int32()),
        "length": pa.array(col_len, pa.int32()),
    })
    total = len(rows) * block_size
    return Batches(table, True, {
        "rows": len(rows), "samples": len(ids), "tokens": int(real), "slots": int(total),
        "padding_waste": round(1 - real / total, 4) if total else 0.0,
        "truncated_samples": int(sum(1 for x in ids if len(x) > block_size)),
        "label_tokens": int(sum(sum(1 for t in lab[:block_size] if t != IGNORE) for lab in labels)),
    })


def bucket(ids: list[list[int]], labels: list[list[int]], max_length: int, micro_batch: int) -> Batches:
    """One row per sample (cut to ``max_length``), sorted by length so a micro batch of neighbours pads
    little; ``position_ids`` are left empty (the loader pads and builds the attention mask)."""
    lengths = np.array([min(len(x), max_length) for x in ids])
    order = np.argsort(lengths, kind="stable")
    col_ids = [ids[j][: lengths[j]] for j in order]
    col_labels = [labels[j][: lengths[j]] for j in order]
    slots = 0
    for s in range(0, len(order), micro_batch):
        slots += int(lengths[order[s:s + micro_batch]].max()) * len(order[s:s + micro_batch])
    real = int(lengths.sum())
    table = pa.table({
        "input_ids": pa.array(col_ids, pa.list_(pa.int32())),
        "labels": pa.array(col_labels, pa.list_(pa.int32())),
        "position_ids": pa.array([[] for _ in col_ids], pa.list_(pa.int32())),
        "samples": pa.array([1] * len(col_ids), pa.int32()),
        "length": pa.array([len(x) for x in col_ids], pa.int32()),
    })
    return Batches(table, False, {
        "rows": len(col_ids), "samples": len(ids), "tokens": real, "slots": slots,
        "padding_waste": round(1 - real / slots, 4) if slots else 0.0,
        "truncated_samples": int(sum(1 for x in ids if len(x) > max_length)),
        "label_tokens": int(sum(sum(1 for t in lab[:max_length] if t != IGNORE) for lab in labels)),
    })


def encode_arrow(tokenizer: Any, samples: pa.Table | Iterable[pa.Table], enable_thinking: bool = False,
                 batch: int = 4096, unlabeled: Callable[[str, str], list[tuple[int, int]]] | None = None
                 ) -> tuple[pa.ChunkedArray, pa.ChunkedArray]:
    """``encode_all`` over samples (``prompt``, ``completion`` columns, the SFT contract, and ``task`` when
    ``unlabeled`` is set: one table, or tables read one after another, e.g. ``Store.read_batches``) as Arrow
    ``list<int32>`` columns (input_ids, labels), ``batch`` rows at a time: Python objects exist for one batch
    only (a whole catalog's samples as Python ints took ~2 GB at 134k items, ``grlm bench scale``). The
    columns stay in their per-batch chunks (no concatenated copy)."""
    id_chunks, lab_chunks = [], []
    for table in [samples] if isinstance(samples, pa.Table) else samples:
        for s in range(0, table.num_rows, batch):
            part = table.slice(s, batch)
            tasks = part.column("task").to_pylist() if unlabeled is not None else None
            ids, labels = encode_all(tokenizer, part.column("prompt").to_pylist(),
                                     part.column("completion").to_pylist(), enable_thinking, batch, unlabeled, tasks)
            id_chunks.append(pa.array(ids, pa.list_(pa.int32())))
            lab_chunks.append(pa.array(labels, pa.list_(pa.int32())))
    t = pa.list_(pa.int32())
    return pa.chunked_array(id_chunks, t), pa.chunked_array(lab_chunks, t)


def bucket_arrow(ids: pa.Array | pa.ChunkedArray, labels: pa.Array | pa.ChunkedArray, max_length: int,
                 micro_batch: int, write: Callable[[Iterator[pa.Table]], Any] | None = None) -> Batches:
    """``bucket`` on Arrow columns (the same rows, order and stats) without a Python object per token. The
    sorted rows are gathered a slice of 65,536 at a time straight from the input's chunks (no concatenated
    copy of the input; rows are cut only when one is longer than ``max_length``). With ``write`` each slice
    goes to it as it is taken and is not kept (e.g. ``StageContext.write_batches``): the returned ``Batches``
    has no table, and the encoded input is the only whole copy in memory (at 300k items the concatenated
    input and the kept sorted copy were ~540 MB of a 2.4 GB peak)."""
    import pyarrow.compute as pc

    id_chunks = ids.chunks if isinstance(ids, pa.ChunkedArray) else [ids]
    lab_chunks = labels.chunks if isinstance(labels, pa.ChunkedArray) else [labels]
    if [len(c) for c in id_chunks] != [len(c) for c in lab_chunks]:  # one chunking for both columns
        id_chunks, lab_chunks = [pa.concat_arrays(id_chunks)], [pa.concat_arrays(lab_chunks)]
    del ids, labels
    full = np.concatenate([pc.list_value_length(c).to_numpy(zero_copy_only=False) for c in id_chunks]
                          or [np.zeros(0)]).astype(np.int64)
    lengths = np.minimum(full, max_length)
    order = np.argsort(lengths, kind="stable")
    cut = bool((full > max_length).any())
    first = np.cumsum([0] + [len(c) for c in id_chunks])  # each chunk's first row

    def gather(chunks: list[pa.Array], rows: np.ndarray) -> pa.Array:
        """``rows`` (global row numbers) of the chunked column, in that order, cut to ``max_length``."""
        which = np.searchsorted(first, rows, side="right") - 1
        by = np.argsort(which, kind="stable")
        bounds = np.searchsorted(which[by], np.arange(len(chunks) + 1))
        parts = [chunks[c].take(pa.array(rows[by[a:b]] - first[c]))
                 for c, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])) if b > a]
        inv = np.empty_like(by)
        inv[by] = np.arange(len(by))
        out = pa.concat_arrays(parts).take(pa.array(inv))
        return pc.list_slice(out, 0, max_length) if cut else out

    sorted_len = lengths[order]
    n = len(order)
    starts = np.arange(0, n, micro_batch)
    slots = int((np.maximum.reduceat(sorted_len, starts) * np.diff(np.append(starts, n))).sum()) if n else 0
    real = int(lengths.sum())
    label_tokens = sum(int(pc.sum(pc.not_equal(pc.list_flatten(pc.list_slice(c, 0, max_length) if cut else c),
                                               IGNORE)).as_py() or 0) for c in lab_chunks)
    step = 1 << 16
    lt = pa.list_(pa.int32())

    def rows() -> Iterator[pa.Table]:
        if not n:
            yield pa.table({"input_ids": pa.array([], lt), "labels": pa.array([], lt), "position_ids": pa.array([], lt),
                            "samples": pa.array([], pa.int32()), "length": pa.array([], pa.int32())})
        for s in range(0, n, step):
            p = order[s:s + step]
            yield pa.table({
                "input_ids": gather(id_chunks, p), "labels": gather(lab_chunks, p),
                "position_ids": pa.ListArray.from_arrays(pa.array(np.zeros(len(p) + 1, np.int32)),
                                                         pa.array([], pa.int32())),
                "samples": pa.array(np.ones(len(p), np.int32)),
                "length": pa.array(sorted_len[s:s + step].astype(np.int32)),
            })

    table: pa.Table | None = None
    if write is not None:
        write(rows())
    else:
        table = pa.concat_tables(list(rows()))
    return Batches(table, False, {
        "rows": n, "samples": n, "tokens": real, "slots": slots,
        "padding_waste": round(1 - real / slots, 4) if slots else 0.0,
        "truncated_samples": int((full > max_length).sum()), "label_tokens": label_tokens,
    })


def collate(rows: list[dict[str, list[int]]], packed: bool, pad_id: int) -> dict[str, Any]:
    """Tensors for one micro batch. Packed rows: input_ids, labels, position_ids (no attention mask, so
    the model masks per segment). Padded rows: right padding + attention mask."""
    import torch

    if packed:
        return {
            "input_ids": torch.tensor([r["input_ids"] for r in rows], dtype=torch.long),
            "labels": torch.tensor([r["labels"] for r in rows], dtype=torch.long),
            "position_ids": torch.tensor([r["position_ids"] for r in rows], dtype=torch.long),
        }
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    lab = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        lab[i, :n] = torch.tensor(r["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": lab, "attention_mask": mask}
