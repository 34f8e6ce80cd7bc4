"""How many of a backbone's own tokens a Term ID costs (issue #35, part 3: the premise that terms are words the LLM
already has). For each TID source: distinct terms, the share of terms that are one token of the tokenizer (as
written in a TID line: after a space), tokens per term (mean over distinct terms and over term occurrences) and
tokens per TID (` w1 w2 w3 w4 w5`), against the one token per term of the CPU recipe's term vocabulary.

    python benchmarks/isolation/tid_tokens.py --tokenizer ~/.cache/grlm-ray/models/SmolLM2-135M-Instruct.Q4_1-<hash> \
        --tids beauty-authors=../shared/data/amazon2014/beauty/items.parquet \
               beauty-ctg=runs/bench-beauty/ctg/terms.parquet --name tid_tokens_smollm2

A TID file is a parquet file with an `item_id` and a list column `terms` (a run's ctg/terms.parquet) or `tid` (a
prepared bundle's items.parquet: the paper authors' TIDs). Writes benchmarks/results/<name>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import pyarrow.parquet as pq


def tid_lists(path: str) -> list[list[str]]:
    names = pq.read_schema(path).names
    col = "terms" if "terms" in names else "tid" if "tid" in names else None
    if col is None:
        raise SystemExit(f"{path}: no 'terms' or 'tid' column (columns: {', '.join(names)})")
    rows = pq.read_table(path, columns=[col]).column(col).to_pylist()
    bad = [i for i, r in enumerate(rows) if not r]
    if bad:
        print(f"{path}: {len(bad)} rows without a TID (first row {bad[0]}), counted apart", file=sys.stderr)
    return [list(r) for r in rows if r]


def measure(tok, tids: list[list[str]]) -> dict[str, float | int]:
    def n_tokens(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"])

    distinct = sorted({t for tid in tids for t in tid})
    per_term = {t: n_tokens(" " + t) for t in distinct}
    occurrences = [per_term[t] for tid in tids for t in tid]
    per_tid = [n_tokens(" " + " ".join(tid)) for tid in tids]
    return {"items": len(tids), "distinct_terms": len(distinct),
            "terms_one_token": round(sum(v == 1 for v in per_term.values()) / len(distinct), 4),
            "term_occurrences_one_token": round(sum(v == 1 for v in occurrences) / len(occurrences), 4),
            "tokens_per_distinct_term": round(statistics.mean(per_term.values()), 3),
            "tokens_per_term_occurrence": round(statistics.mean(occurrences), 3),
            "tokens_per_tid": round(statistics.mean(per_tid), 3),
            "tokens_per_tid_max": max(per_tid),
            "terms_per_tid": round(statistics.mean(len(t) for t in tids), 3),
            "examples": {t: tok.convert_ids_to_tokens(tok(" " + t, add_special_tokens=False)["input_ids"])
                         for t in sorted(distinct, key=lambda t: -per_term[t])[:3]}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizer", required=True, help="a local folder with the backbone's tokenizer")
    ap.add_argument("--tids", nargs="+", required=True, metavar="NAME=PARQUET")
    ap.add_argument("--name", default="tid_tokens")
    args = ap.parse_args(argv)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    rows = []
    for spec in args.tids:
        name, sep, path = spec.partition("=")
        if not sep:
            raise SystemExit(f"--tids {spec!r}: expected NAME=PARQUET")
        rows.append({"tids": name, **measure(tok, tid_lists(path))})
        r = rows[-1]
        print(f"{name:>18}: {r['distinct_terms']:>6} terms, {r['terms_one_token']:.1%} one token "
              f"({r['term_occurrences_one_token']:.1%} of occurrences), "
              f"{r['tokens_per_term_occurrence']:.2f} tokens/term, {r['tokens_per_tid']:.2f} tokens/TID "
              f"(max {r['tokens_per_tid_max']}); one token per term: {r['terms_per_tid']:.2f}")
    out = {"tokenizer": Path(args.tokenizer).name, "vocab_size": len(tok), "rows": rows,
           "command": "python benchmarks/isolation/tid_tokens.py --tokenizer <" + Path(args.tokenizer).name + "> --tids "
                      + " ".join(s.split("=", 1)[0] + "=<...>" for s in args.tids)}
    dest = Path(__file__).resolve().parents[1] / "results" / f"{args.name}.json"
    dest.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
