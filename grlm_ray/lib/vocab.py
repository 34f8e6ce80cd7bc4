"""Vocabulary pruning for from-scratch CPU backbones: a smaller, standalone byte-level BPE tokenizer.

The output layer dominates the cost of a tiny decoder over a 49k-token vocabulary, yet a catalog's
corpus uses a few thousand tokens. ``prune_tokenizer`` keeps the tokens the corpus uses, every token on
their merge paths, the 256 byte symbols and the special tokens, renumbered densely. Because each
byte-level BPE token is produced by exactly one merge, the kept merges are exactly the ones the original
tokenizer applies to corpus text, in the same rank order, so corpus text encodes to the same tokens
(new ids) and any other text still encodes (into shorter pieces). The result is an ordinary HF
tokenizer folder: transformers and vLLM load it with the exported model, no id map at run time.
"""

from __future__ import annotations

import json
from itertools import islice
from typing import Any, Iterable

from grlm_ray.core.errors import GrlmError
from grlm_ray.lib.decoding import tid_token_seqs


def _bytes_alphabet() -> list[str]:
    # GPT-2 byte-to-unicode table: the 256 symbols every byte-level BPE starts from
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def prune_tokenizer(tokenizer: Any, texts: Iterable[str], chunk_size: int = 16384) -> tuple[Any, dict[str, Any]]:
    """Return (pruned fast tokenizer, report). ``tokenizer``: a HF fast byte-level BPE tokenizer; ``texts``:
    any iterable (a generator is read once)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec["model"]
    if model.get("type") != "BPE" or (spec.get("pre_tokenizer") or {}).get("type") != "ByteLevel":
        raise GrlmError("vocabulary pruning supports byte-level BPE tokenizers (GPT-2 / Llama-3 / Qwen / "
                        f"SmolLM style); this one is {model.get('type')} with {spec.get('pre_tokenizer')}")
    vocab: dict[str, int] = model["vocab"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    producer: dict[str, tuple[str, str]] = {}
    for a, b in merges:
        producer.setdefault(a + b, (a, b))

    used_ids: set[int] = set()
    # streamed in chunks, each distinct text of a chunk once (every SFT sample repeats the system prompt),
    # encoded in batches (the fast tokenizer's batch call runs in Rust; one call per text took most of the
    # 101 s of tokenization at 300k); only one chunk of texts is held at a time
    it = iter(texts)
    while chunk := list(dict.fromkeys(islice(it, chunk_size))):
        for ids in tokenizer(chunk, add_special_tokens=False)["input_ids"]:
            used_ids.update(ids)
    inv = {i: t for t, i in vocab.items()}
    keep: set[str] = {s for s in _bytes_alphabet() if s in vocab}
    stack = [inv[i] for i in used_ids if i in inv]
    while stack:
        tok = stack.pop()
        if tok in keep:
            continue
        keep.add(tok)
        if tok in producer:
            stack.extend(producer[tok])
    # added tokens: the special ones always, the others (e.g. TID terms) only where the corpus uses them
    added = sorted((a for a in spec.get("added_tokens", []) if a.get("special") or a["id"] in used_ids),
                   key=lambda a: a["id"])
    added_contents = {a["content"] for a in added}
    # specials first (their ids stay small and stable), then kept tokens in original id order
    order = [a["content"] for a in added] + sorted((t for t in keep if t not in added_contents), key=lambda t: vocab[t])
    new_vocab = {t: i for i, t in enumerate(order)}
    for a in added:
        a["id"] = new_vocab[a["content"]]
    model["vocab"] = new_vocab
    model["merges"] = [[a, b] for a, b in merges if a in new_vocab and b in new_vocab and (a + b) in new_vocab
                       and producer.get(a + b) == (a, b)]
    spec["added_tokens"] = added
    pp = spec.get("post_processor")
    if pp and pp.get("special_tokens"):
        for st in pp["special_tokens"].values():
            st["ids"] = [new_vocab[t] for t in st.get("tokens", [])]
    pruned = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)))
    for attr in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            setattr(pruned, attr, value)
    pruned.chat_template = tokenizer.chat_template
    report = {"vocab_before": len(tokenizer), "vocab_after": len(pruned), "corpus_tokens_used": len(used_ids),
              "merges_before": len(merges), "merges_after": len(model["merges"])}
    return pruned, report


def add_term_tokens(tokenizer: Any, terms: Iterable[str]) -> dict[str, Any]:
    """Make every TID term one token of ``tokenizer`` (in place), spelled as the text format writes it:
    after a space (`` term``; a TID starts with ``decoding.TID_START``, also at the start of a line). They
    are added tokens (matched before the BPE, longest first), so the tokenizer stays an ordinary HF folder;
    other text still goes through the BPE. A spaced term also matches the start of a longer word in free
    text (`` color`` in `` colorful``), which only changes how such text splits."""
    from tokenizers import AddedToken

    # ASCII terms only: the byte-level decoder would read a non-ASCII added token's characters as byte
    # symbols (``crème`` decodes to ``cr\ufffdme``); those few terms keep their BPE pieces
    every = {t for t in terms if t and not any(ch.isspace() for ch in t)}
    words = sorted(t for t in every if t.isascii())
    if not words:
        raise GrlmError("model.vocab=terms: the terms table has no terms")
    before = len(tokenizer)
    tokenizer.add_tokens([AddedToken(" " + w, single_word=False, normalized=False) for w in words])
    return {"terms": len(words), "terms_left_to_bpe": len(every) - len(words),
            "term_tokens_added": len(tokenizer) - before}


def tokens_per_tid(tokenizer: Any, tid_texts: Iterable[str]) -> dict[str, float]:
    """How many tokens a TID takes at the start of an answer (its end marker excluded): mean and max."""

    lengths = [len(ids) for ids in tid_token_seqs(tokenizer, list(tid_texts))]
    if not lengths:
        return {"mean": 0.0, "max": 0}
    return {"mean": round(sum(lengths) / len(lengths), 3), "max": max(lengths)}
