"""The text format that training, evaluation and serving share: how an item, a history and a task prompt are
written. One place, read by the sft stage (training data), eval / validation (prompts), serving, the
tokenizer and the diagnostics.

- an item is one line `` <term> <term> ... | <title>``: the TID starts with a space (``TID_START``, so a
  term is spelled the same at the start of a line as after another term) and is always closed by `` |``
  (``END_MARKER``) so a decoder knows where it ends (the title is never generated at inference);
- sequence prediction: the prompt holds the first item of the (last ``max_history``) history, the
  completion writes every following item, one line each. At inference the same prompt is followed by the
  history's later lines as the start of the answer, and the model writes the next TID.
- held-out items (the valid/test target positions in prepare/targets) never appear in training
  sequences (``training_sequences``).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import pyarrow as pa

from grlm_ray.core.config import GrlmConfig, SFTConfig
from grlm_ray.lib.decoding import END_MARKER, TID_START
from grlm_ray.lib.eig import tid_text

# v3: a TID starts with a space; v2: sft.item_text chooses the item line (v1 = tid_title)
PROMPT_VERSION = "iift-v3"

SYSTEM = ("You are a product recommender. Every product is written on one line as its Term ID (a few words) "
          "followed by ' | ' and its title.")
GTI_USER = "Product: {meta}\nWrite this product's Term ID."
SEQ_USER = ("A customer's products in the order they were bought. The first one:\n{line}\n"
            "Write the products that follow, one per line.")
COLLAB_USER = "Product:\n{line}\nWrite the products most often bought together with it, one per line."
# sft.prompt=short: the same tasks with one-word instructions. A scratch model learns nothing from the
# long wording, which is most of a sequence sample's tokens (measured on Beauty: 82 prompt tokens for a
# 36-token TID-only completion); a pretrained LLM may want the full sentences.
PROMPTS = {
    "full": {"system": SYSTEM, "gti": GTI_USER, "seq": SEQ_USER, "collab": COLLAB_USER},
    "short": {"system": "Recommender.", "gti": "Item: {meta}\nTID:", "seq": "Next:\n{line}",
              "collab": "Together:\n{line}"},
}


def messages(style: str, task: str, **fields: str) -> list[dict[str, str]]:
    p = PROMPTS[style]
    return [{"role": "system", "content": p["system"]}, {"role": "user", "content": p[task].format(**fields)}]


def _clip(text: str, limit: int) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def item_line(terms: Sequence[str], title: str, max_title_chars: int = 120, with_title: bool = True) -> str:
    """`` w1 w2 w3 w4 w5 | Title`` (TID alone, still closed by `` |``, when there is no title or
    ``with_title`` is off)."""
    title = _clip(title, max_title_chars) if with_title else ""
    return tid_completion(terms) + (f" {title}" if title else "")


def line_writer(c: SFTConfig):
    """``(terms, title) -> line`` in the configured ``sft.item_text`` format: the one writer training,
    evaluation and serving share."""
    with_title = c.item_text != "tid"
    return lambda terms, title: item_line(terms, title, c.max_title_chars, with_title)


def title_spans(completion: str) -> list[tuple[int, int]]:
    """Character spans of the titles in a completion (after each line's first `` |``, to the line's end):
    what ``sft.item_text=tid_title_input`` leaves out of the loss."""
    spans, start = [], 0
    for line in completion.split("\n"):
        cut = line.find(END_MARKER)
        if cut >= 0 and cut + len(END_MARKER) < len(line):
            spans.append((start + cut + len(END_MARKER), start + len(line)))
        start += len(line) + 1
    return spans


def unlabeled_spans(c: SFTConfig) -> Callable[[str, str], list[tuple[int, int]]] | None:
    """``(task, completion) -> character spans`` that training reads but leaves out of the loss (sorted,
    disjoint), or None when every completion character is a label: titles for ``sft.item_text=tid_title_input``,
    every line before the last of a sequence sample for ``sft.seq_targets=last``."""
    titles, last = c.item_text == "tid_title_input", c.seq_targets == "last"
    if not (titles or last):
        return None

    def spans(task: str, completion: str) -> list[tuple[int, int]]:
        out = title_spans(completion) if titles else []
        cut = completion.rfind("\n") + 1 if last and task == "seq" else 0
        return ([(0, cut)] if cut else []) + [s for s in out if s[0] >= cut]

    return spans


def gti_prompt(item: dict[str, Any], max_chars: int, style: str = "full") -> list[dict[str, str]]:
    return messages(style, "gti", meta=describe(item, max_chars))


def seq_prompt(first_line: str, style: str = "full") -> list[dict[str, str]]:
    return messages(style, "seq", line=first_line)


def history_prompt(lines: Sequence[str], max_history: int, style: str = "full") -> tuple[list[dict[str, str]], str]:
    """(messages, start of the answer) for predicting the item after ``lines`` (oldest first).
    The model continues the answer with the next item's TID."""
    if not lines:
        raise ValueError("a history needs at least one item")
    window = list(lines)[-max_history:]
    return seq_prompt(window[0], style), "".join(line + "\n" for line in window[1:])


def item_text(title: str, description: str, categories: list[str], brand: str, category: str,
              max_chars: int) -> str:
    """The text an item is known by: title, description, categories, brand (empty parts skipped)."""
    parts = [title.strip(), description.strip()]
    if categories:
        parts.append("Categories: " + ", ".join(categories))
    if brand.strip():
        parts.append("Brand: " + brand.strip())
    text = ". ".join(p for p in parts if p)
    if not text:  # no text at all: the category name is all we know (counted in the manifest)
        text = category or "item"
    return text[:max_chars]


def tid_completion(terms: Sequence[str]) -> str:
    """`` w1 w2 w3 w4 w5 |``: how a TID is written (GTI's answer, the start of every item line)."""
    return TID_START + tid_text(terms) + END_MARKER


def describe(item: dict[str, Any], limit: int) -> str:
    """An item's metadata as one text (title, brand, categories, description), clipped: what CTG shows the
    LLM for an item and its neighbours, and what GTI asks the model to name."""
    parts = [item.get("title") or ""]
    if item.get("brand"):
        parts.append(f"Brand: {item['brand']}")
    if item.get("categories"):
        parts.append("Categories: " + ", ".join(item["categories"]))
    if item.get("description"):
        parts.append(item["description"])
    text = ". ".join(p for p in parts if p) or f"A product in {item.get('category') or 'the catalog'}"
    return _clip(text, limit)



# --------------------------------------------------------------------------- splits
def training_lists(sequences: pa.Table, targets: pa.Table) -> pa.ListArray:
    """Each user's items (one list per ``sequences`` row, in its order) with every held-out (valid/test
    target) position removed: Arrow columns end to end, no Python object per interaction."""
    import numpy as np
    import pyarrow.compute as pc

    col = sequences.column("item_ids").combine_chunks()
    if not isinstance(col, pa.ListArray):  # an empty table: no chunks, no type information kept
        col = pa.array([], pa.list_(pa.string()))
    flat = pc.list_flatten(col)
    offs = col.offsets.to_numpy().astype(np.int64)
    offs -= offs[0] if len(offs) else 0
    keep = np.ones(len(flat), dtype=bool)
    if targets.num_rows and len(col):
        where = pc.index_in(targets.column("user_id"), value_set=sequences.column("user_id"))
        known = pc.is_valid(where).to_numpy(zero_copy_only=False)
        row = where.fill_null(0).to_numpy().astype(np.int64)[known]
        pos = targets.column("position").to_numpy().astype(np.int64)[known]
        inside = (pos >= 0) & (pos < np.diff(offs)[row])
        keep[offs[row[inside]] + pos[inside]] = False
    kept_before = np.concatenate([[0], np.cumsum(keep)])
    return pa.ListArray.from_arrays(pa.array(kept_before[offs].astype(np.int32)), flat.filter(pa.array(keep)))


def training_sequences(sequences: pa.Table, targets: pa.Table, batch: int = 65536) -> dict[str, list[str]]:
    """Each user's items with every held-out (valid/test target) position removed, in order. Read a batch
    of users at a time; an item id is one string object however many histories hold it."""
    lists = training_lists(sequences, targets)
    users = sequences.column("user_id")
    canon: dict[str, str] = {}
    out: dict[str, list[str]] = {}
    for s in range(0, len(lists), batch):
        for u, items in zip(users.slice(s, batch).to_pylist(), lists.slice(s, batch).to_pylist()):
            out[u] = [canon.setdefault(i, i) for i in items]
    return out


def domain_lookup(cfg: GrlmConfig):
    only = next(iter(cfg.data.domains))
    if cfg.data.namespaced:
        return lambda item_id: item_id.split("/", 1)[0]
    return lambda item_id: only


