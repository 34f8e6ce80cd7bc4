"""Batched beam search over TIDs (transformers), optionally constrained by a token trie of valid TIDs.

- Left padding, so every prompt in a batch ends where generation starts (right padding, as in the
  reference evaluation, makes the model continue after pad tokens).
- The KV cache is reused across steps by ``generate`` (``use_cache=True``).
- Constrained decoding: a trie over the token sequences of every catalog TID (+ EOS) gives the tokens
  allowed after each prefix, so every finished beam is a real item's TID (VR = 1). When the allowed set
  is empty (a prefix that is not in the trie), EOS alone is allowed and the event is counted:
  ``prefix_allowed_tokens_fn`` returning an empty list would otherwise let transformers fall back to
  an unconstrained step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence


@dataclass
class TidTrie:
    """Token trie: children[node] maps a token id to the next node; ``end`` marks complete TIDs."""

    eos_token_id: int
    children: list[dict[int, int]] = field(default_factory=lambda: [{}])
    empty_hits: int = 0  # prefixes outside the trie seen while decoding (constraint forced EOS)

    @classmethod
    def build(cls, token_seqs: Sequence[Sequence[int]], eos_token_id: int) -> "TidTrie":
        trie = cls(eos_token_id)
        for seq in token_seqs:
            node = 0
            for tok in list(seq) + [eos_token_id]:
                nxt = trie.children[node].get(tok)
                if nxt is None:
                    nxt = len(trie.children)
                    trie.children[node][tok] = nxt
                    trie.children.append({})
                node = nxt
        return trie

    def allowed(self, prefix: Sequence[int]) -> list[int]:
        node = 0
        for tok in prefix:
            if tok == self.eos_token_id and node != 0 and not self.children[node]:
                break
            node = self.children[node].get(int(tok), -1)
            if node < 0:
                self.empty_hits += 1
                return [self.eos_token_id]
        nxt = list(self.children[node])
        if not nxt:  # a complete TID (after its EOS): only padding/EOS may follow
            return [self.eos_token_id]
        return nxt


def tid_token_seqs(tokenizer: Any, tid_texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each TID text as the model writes it at the start of its answer."""
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in tid_texts]


def beam_search(model: Any, tokenizer: Any, prompts: Sequence[str], *, num_beams: int = 20,
                max_new_tokens: int = 30, trie: TidTrie | None = None, batch_size: int = 8,
                stop_token_ids: Sequence[int] | None = None) -> list[list[str]]:
    """For each prompt (already rendered text), up to ``num_beams`` distinct continuations, best first.
    A beam ends at the trie's end token (constrained) or at any of ``stop_token_ids`` (default: EOS)."""
    import torch

    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    eos: Any = trie.eos_token_id if trie is not None else (list(stop_token_ids) if stop_token_ids
                                                           else tokenizer.eos_token_id)
    out: list[list[str]] = []
    for s in range(0, len(prompts), batch_size):
        chunk = list(prompts[s:s + batch_size])
        enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        prompt_len = enc["input_ids"].shape[1]  # the same for every row under left padding
        kwargs: dict[str, Any] = {}
        if trie is not None:
            def allowed(batch_id: int, input_ids: "torch.Tensor") -> list[int]:
                return trie.allowed(input_ids[prompt_len:].tolist())

            kwargs["prefix_allowed_tokens_fn"] = allowed
        with torch.inference_mode():
            gen = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], num_beams=num_beams, num_return_sequences=num_beams, do_sample=False,
                                 max_new_tokens=max_new_tokens, early_stopping=True, use_cache=True,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=eos,
                                 temperature=None, top_p=None, top_k=None, **kwargs)
        new = gen[:, prompt_len:]  # [batch * beams, new]
        texts = tokenizer.batch_decode(new, skip_special_tokens=True)
        for b in range(len(chunk)):
            # identical texts can come back twice (a hypothesis finished at two steps): keep the first
            out.append(list(dict.fromkeys(t.strip() for t in texts[b * num_beams:(b + 1) * num_beams])))
    return out
