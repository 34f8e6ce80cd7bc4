"""Term generation with an LLM, the library under the CTG stage and the serving term writer: the CTG prompt
(an item and its neighbours), parsing and validating an answer (exactly N distinct lowercase base-form
terms), repair of answers that do not validate, and ``TermWriter`` (generate, validate, retry with seeded
sampling, repair) for a batch of items.
"""

from __future__ import annotations

import functools
import json
import re
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pyarrow as pa

from grlm_ray.core.config import CTGConfig
from grlm_ray.lib.generation import make_generator
from grlm_ray.lib.terms import STOPWORDS, base_form, colliding_items, text_words
from grlm_ray.lib.textformat import describe

PROMPT_VERSION = "ctg-v1"
ANSWER_PREFIX = "Terms:"

CTG_SYSTEM = "You write short Term IDs that identify products in a catalog."
INSTRUCTIONS = (
    "Write exactly {n} words that identify the product below, lowercase, each in its base form, ordered by "
    "importance: {order}.{context_rule} Answer with one line: Terms: {example}"
)
ORDER = ["category or type", "function", "distinctive feature", "audience", "selling point"]
CONTEXT_RULE = (" Use the same words as the similar products for what they share, and 1-2 words that set "
                "this product apart from them.")


def build_messages(item: dict[str, Any], neighbors: list[dict[str, Any]], cfg: CTGConfig,
                   examples: Sequence[tuple[dict[str, Any], Sequence[str]]] = ()) -> list[dict[str, str]]:
    """The paper's prompt: the item's metadata and (unless context='none') its neighbours' metadata. With
    ``examples`` ((item, its terms) pairs, at most ``cfg.few_shot``) the instructions come with worked
    examples first, as earlier turns: product -> ``Terms: ...``; then the item."""
    n = cfg.num_terms
    use_ctx = bool(cfg.context == "neighbors" and neighbors)
    order = ", ".join(ORDER[: min(n, len(ORDER))]) + (", then more details" if n > len(ORDER) else "")
    slots = [f"<{o}>" for o in ORDER[:n]] + [f"<detail {i + 1}>" for i in range(max(0, n - len(ORDER)))]
    user = INSTRUCTIONS.format(n=n, order=order, context_rule=CONTEXT_RULE if use_ctx else "",
                               example=", ".join(slots))
    turns: list[dict[str, str]] = []
    for j, (ex, terms) in enumerate(list(examples)[: cfg.few_shot]):
        ask = (user + "\n\n" if j == 0 else "") + "Product: " + describe(ex, cfg.max_neighbor_chars)
        turns += [{"role": "user", "content": ask}, {"role": "assistant", "content": f"{ANSWER_PREFIX} {', '.join(terms)}"}]
    last = ("" if turns else user + "\n\n") + "Product: " + describe(item, cfg.max_item_chars)
    if use_ctx:
        last += "\n\nSimilar products:\n" + "\n".join(
            "- " + describe(nb, cfg.max_neighbor_chars) for nb in neighbors[: cfg.num_neighbors])
    return [{"role": "system", "content": CTG_SYSTEM}, *turns, {"role": "user", "content": last}]


def words_tid(item: dict[str, Any], context: Sequence[dict[str, Any]], n: int) -> list[str]:
    """The title-word TID (``ctg.method=words``, ``ctg.uncovered=words``): the item's own title words first,
    then its description, its neighbours' titles, its category."""
    return repair([], [item["title"], item["description"]] + [x["title"] for x in context], item["category"], n)


def statistics_needed(cfg: CTGConfig, examples_are_statistical: bool) -> bool:
    """Whether term writing needs statistical CTG's writer: the lexical method, an LLM repaired by it, or
    few-shot examples whose TIDs it writes (the CTG stage's; serving shows the catalog's own TIDs instead)."""
    return cfg.method == "lexical" or (cfg.method == "llm" and (
        cfg.repair == "lexical" or (examples_are_statistical and cfg.few_shot > 0)))


def writer_request(item: dict[str, Any], context: Sequence[dict[str, Any]], cfg: CTGConfig,
                   examples: Sequence[tuple[dict[str, Any], Sequence[str]]] = (),
                   lexical: Sequence[str] = ()) -> dict[str, Any]:
    """What ``TermWriter`` reads for one item (one row of its batch): the prompt (the item, its neighbours
    ``context``, worked ``examples``), the texts the words repair falls back on, and the statistical TID
    the lexical repair uses. The one place both the CTG stage and serving's catalog updates build it."""
    return {"item_id": item["item_id"], "category": item["category"],
            "messages": json.dumps(build_messages(item, list(context), cfg, examples)),
            "fallback": json.dumps([item["title"], item["description"]] + [x["title"] for x in context]),
            "lexical": json.dumps(list(lexical))}


@dataclass(frozen=True)
class TidJob:
    """One item whose TID is to be written, with what the writer looks at: its ``context`` (neighbour rows
    in the catalog; none for ``ctg.context: none``), worked ``examples`` ((neighbour, its TID) pairs, the
    CTG stage's statistical TIDs or serving's live ones) and its statistical TID (``lexical``, when
    ``statistics_needed``)."""

    item: dict[str, Any]
    context: Sequence[dict[str, Any]] = ()
    examples: Sequence[tuple[dict[str, Any], Sequence[str]]] = ()
    lexical: Sequence[str] = ()

    def request(self, cfg: CTGConfig) -> dict[str, Any]:
        return writer_request(self.item, self.context, cfg, self.examples, self.lexical)


def by_rules(cfg: CTGConfig) -> bool:
    """``ctg.method`` words / lexical: written by rules in one process, no LLM."""
    return cfg.method != "llm"


def rule_tids(cfg: CTGConfig, jobs: Sequence[TidJob]) -> list[dict[str, Any]]:
    """TIDs by rules: ``words`` the item's own title words first (``words_tid``), ``lexical`` its statistical
    TID. Each a record as ``write_tids`` returns."""
    if cfg.method == "words":
        tids = [words_tid(j.item, j.context, cfg.num_terms) for j in jobs]
    elif cfg.method == "lexical":
        tids = [list(j.lexical) for j in jobs]
    else:
        raise ValueError(f"ctg.method={cfg.method!r} is not written by rules")
    return [{"item_id": j.item["item_id"], "terms": t, "raw": "", "valid": True, "source": cfg.method,
             "attempts": 1, "reason": "ok"} for j, t in zip(jobs, tids)]


def write_tids(cfg: CTGConfig, jobs: Sequence[TidJob], llm: "TermWriter | None" = None,
               deadline: float | None = None) -> list[dict[str, Any]]:
    """Every TID written for new items in one process, the one dispatch both the CTG stage (its rule methods;
    its LLM path sends the same ``TidJob.request`` rows to ``TermWriter`` actors) and serving's catalog
    updates use: records (item_id, terms, raw, valid, source, attempts, reason)."""
    if not jobs:
        return []
    if by_rules(cfg):
        return rule_tids(cfg, jobs)
    if llm is None:
        raise ValueError("ctg.method=llm needs a TermWriter")
    requests = [j.request(cfg) for j in jobs]
    batch = {key: np.array([q[key] for q in requests], dtype=object) for key in requests[0]}
    res = llm({"row": np.arange(len(jobs)), **batch}, deadline)
    return [{"item_id": j.item["item_id"], "terms": str(res["terms"][n]).split("\t"), "raw": str(res["raw"][n]),
             "valid": bool(res["valid"][n]), "source": str(res["source"][n]), "attempts": int(res["attempts"][n]),
             "reason": str(res["reason"][n])} for n, j in enumerate(jobs)]


@dataclass
class Parsed:
    terms: list[str]  # cleaned, distinct, in order
    valid: bool
    reason: str


_SPLIT = re.compile(r"[,;\n|/]+|\s+-\s+|\d+[.)]\s*")
_CLEAN = re.compile(r"[^a-z\- ]+")


# words that only echo the instructions ("category", "word1", "selling point"), never real terms
INSTRUCTION_WORDS = frozenset("word category type function feature distinctive audience selling point "
                              "product name term terms item detail".split())


def normalize_term(raw: str) -> str:
    """'Tea Tree' -> 'tea-tree'; 'Brushes' -> 'brush'; junk and stopwords -> ''."""
    t = _CLEAN.sub(" ", re.sub(r"['\u2019]s\b", "", raw.lower())).strip(" -")
    words = [w for w in re.split(r"[\s]+", t) if w and w not in STOPWORDS and w.strip("-") not in INSTRUCTION_WORDS]
    if not words or len(words) > 3:
        return ""
    if len(words) == 1:
        w = words[0].strip("-")
        if "-" in w:
            w = "-".join(p for p in w.split("-") if p)
        if len(w) < 2 or w in STOPWORDS:
            return ""
        return base_form(w)
    return "-".join(base_form(w) if i == len(words) - 1 else w for i, w in enumerate(words))


_LABEL = re.compile(r"\s*terms?\s*:", re.I)  # a repeated 'Terms:' label, recognised at the answer's start only
_BULLET = re.compile(r"^([-*\u2022]|\d+[.)])\s")


def parse_terms(text: str, n: int) -> Parsed:
    """Parse an LLM answer (the text after the 'Terms:' prefix) into exactly n distinct terms: its first
    non-empty line, or a bulleted / numbered list that starts there (a repeated ``Terms:`` label skipped)."""
    body = text.strip()
    m = _LABEL.match(body)
    if m:
        body = body[m.end():]
    lines = [ln.strip() for ln in body.strip().splitlines() if ln.strip()]
    if not lines:
        pieces: list[str] = []
    elif _BULLET.match(lines[0]) and len(lines) > 1:
        # a bulleted / numbered list, one term per line
        pieces = [re.sub(r"^([-*\u2022]|\d+[.)])\s*", "", ln) for ln in lines[: n + 2]]
    else:
        pieces = [p for p in _SPLIT.split(lines[0]) if p and p.strip()]
        if len(pieces) == 1 and " " in pieces[0].strip():
            pieces = pieces[0].split()  # "shampoo hair gentle ..." without commas
    terms: list[str] = []
    dropped = 0
    for p in pieces:
        t = normalize_term(p)
        if not t:
            dropped += 1
            continue
        if t not in terms:
            terms.append(t)
    if len(terms) == n:
        return Parsed(terms, True, "ok")
    if len(terms) > n:
        return Parsed(terms, False, f"{len(terms)} terms, expected {n}")
    return Parsed(terms, False, f"{len(terms)} usable terms, expected {n}" + (f" ({dropped} junk)" if dropped else ""))


def answer_settled(text: str, n: int) -> bool:
    """True once more generated text cannot change the verdict of ``parse_terms(text, n)``, so decoding can
    stop: the answer's first line is complete (not a list) or a list has the n + 2 lines the parser reads
    (the parse is final), or the first line already holds more than n distinct terms before its last
    separator (invalid whatever follows; its leading terms, the ones a repair reads first, are final)."""
    body = text.lstrip()
    m = _LABEL.match(body)
    if m:
        body = body[m.end():]
    elif re.fullmatch(r"t(e(r(ms?)?)?)?\s*", body, re.I):
        return False  # the label may still be coming
    lines = body.lstrip().split("\n")
    first, complete = lines[0].strip(), len(lines) > 1
    if not first:
        return False
    if _BULLET.match(first):
        return sum(1 for ln in lines[:-1] if ln.strip()) >= n + 2
    if complete:
        return True
    pieces = [p for p in _SPLIT.split(first)[:-1] if p and p.strip()]  # the last piece may still grow
    return len({t for t in map(normalize_term, pieces) if t}) > n


def repair(parsed: list[str], fallback_texts: list[str], category: str, n: int) -> list[str]:
    """Keep the LLM's terms that are grounded in the item's or its neighbours' text (an invalid answer
    often carries fragments such as 'fluid-oun'), then fill from the item's own words and its context."""
    known = {w for text in fallback_texts for w in text_words(text)}
    grounded = [t for t in dict.fromkeys(parsed) if all(part in known for part in t.split("-"))
                or t in known]
    terms = grounded[:n]
    for text in fallback_texts:
        for w in text_words(text):
            if len(terms) >= n:
                return terms
            if w not in terms:
                terms.append(w)
    for w in [normalize_term(category) or "item", "product", "item", "goods", "article"]:
        if len(terms) >= n:
            break
        if w and w not in terms:
            terms.append(w)
    return terms[:n]


def example_tids(conversation: list[dict[str, str]], n: int) -> list[frozenset[str]]:
    """The TIDs of the worked examples in a CTG conversation (its earlier assistant turns), as term sets."""
    out = []
    for m in conversation:
        if m["role"] == "assistant":
            body = m["content"][len(ANSWER_PREFIX):] if m["content"].startswith(ANSWER_PREFIX) else m["content"]
            out.append(frozenset(parse_terms(body, n).terms))
    return out


def own_words(texts: Sequence[str]) -> frozenset[str]:
    """The item's own candidate words (base forms, as ``terms.text_words``) of its title and description."""
    return frozenset(w for t in texts for w in text_words(t or ""))


def judge(text: str, n: int, examples: Sequence[frozenset[str]] = (), own: frozenset[str] | None = None) -> Parsed:
    """``parse_terms``, and two checks that the answer is about this item: it does not repeat a worked
    example's TID, and at least one of its terms (or a part of a compound) is a word of the item's own text
    (``own``). The small CPU LLMs answer an item they cannot describe with a neighbour's TID or most of one
    (a mascara's ``zenra volumize mascara woman hydrate`` for a makeup mirror): valid in form, wrong."""
    p = parse_terms(text, n)
    if p.valid and frozenset(p.terms) in examples:
        return Parsed(p.terms, False, "repeats a worked example's TID")
    if p.valid and own is not None and not any(
            t in own or any(base_form(part) in own for part in t.split("-") if part) for t in p.terms):
        return Parsed(p.terms, False, "no term is a word of the item's own text")
    return p


class TermWriter:
    """Ray Data callable class: generate, validate, retry, repair for a batch of prompts."""

    def __init__(self, model_path: str, cfg: CTGConfig, threads: int) -> None:
        self.cfg = cfg
        self.gen = make_generator(model_path, cfg.llm, threads)

    def __call__(self, batch: dict[str, np.ndarray], deadline: float | None = None) -> dict[str, Any]:
        """``deadline`` (a ``time.monotonic()`` instant; serving's term-writer budget): decoding stops there,
        no retry starts after it, and an answer it cut is repaired like any answer that does not validate."""
        cfg, n = self.cfg, self.cfg.num_terms
        convs = [json.loads(m) for m in batch["messages"]]
        stop = functools.partial(answer_settled, n=n)  # decoding ends once the answer is settled
        raws = self.gen.generate(convs, prefix=ANSWER_PREFIX, temperature=0.0, stop=stop, deadline=deadline)
        shown = [example_tids(c, n) for c in convs]
        # the item's own title and description: the first two texts of its repair fallback
        owns = [own_words(json.loads(f)[:2]) for f in batch["fallback"]]
        parsed = [judge(r, n, ex, own) for r, ex, own in zip(raws, shown, owns)]
        attempts = np.ones(len(convs), dtype=np.int32)
        for attempt in range(cfg.retries):
            todo = [i for i, p in enumerate(parsed) if not p.valid]
            if not todo or (deadline is not None and time.monotonic() >= deadline):
                break
            seed = cfg.seed + 1000 * (attempt + 1) + int(batch["row"][todo[0]])
            again = self.gen.generate([convs[i] for i in todo], prefix=ANSWER_PREFIX,
                                      temperature=cfg.retry_temperature, seed=seed, stop=stop, deadline=deadline)
            for i, r in zip(todo, again):
                attempts[i] += 1
                p = judge(r, n, shown[i], owns[i])
                if p.valid or len(p.terms) >= len(parsed[i].terms):
                    parsed[i], raws[i] = p, r
        out_terms, valid, source, reasons = [], [], [], []
        late = deadline is not None and time.monotonic() >= deadline  # the budget ended decoding or retries
        for i, p in enumerate(parsed):
            if p.valid:
                out_terms.append(p.terms)
                source.append("llm")
            else:
                lexical = json.loads(batch["lexical"][i]) if "lexical" in batch else []
                if lexical:  # ctg.repair=lexical: CTG's rules without the LLM (computed by the driver)
                    out_terms.append(lexical)
                else:
                    fallback = json.loads(batch["fallback"][i])
                    out_terms.append(repair(p.terms, fallback, str(batch["category"][i]), n))
                source.append("llm+repair")
            valid.append(p.valid)
            reasons.append(f"out of time: {p.reason}" if late and not p.valid else p.reason)
        # terms travel as one '\t'-joined string: a column of variable-length lists would be pickled by Ray Data
        return {"item_id": batch["item_id"], "terms": np.array(["\t".join(t) for t in out_terms], dtype=object),
                "raw": np.array([ANSWER_PREFIX + r for r in raws], dtype=object),
                "valid": np.array(valid), "source": np.array(source, dtype=object),
                "attempts": attempts, "reason": np.array(reasons, dtype=object)}


def tid_stats(tids: list[list[str]]) -> dict[str, Any]:
    keys = [tuple(t) for t in tids]
    n = len(keys)
    colliding = colliding_items(keys)
    width = max((len(k) for k in keys), default=0)
    return {
        "items": n, "unique_tids": len(set(keys)), "unique_terms": len({t for k in keys for t in k}),
        "per_position_vocab": [len({k[j] for k in keys if len(k) > j}) for j in range(width)],
        "colliding_items": colliding, "collision_rate": round(colliding / n, 6) if n else 0.0,
    }


def select_items(items: pa.Table, cfg: CTGConfig) -> pa.Table:
    if cfg.limit is None:
        return items
    if cfg.sample:
        rng = np.random.default_rng(cfg.seed)
        idx = np.sort(rng.choice(items.num_rows, size=min(cfg.limit, items.num_rows), replace=False))
        return items.take(pa.array(idx))
    return items.slice(0, cfg.limit)


