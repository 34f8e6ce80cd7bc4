"""Libraries the stages and serving share: the TID text format, term generation and rules, tokenizers and vocabularies, decoding and grounding, metrics and the evaluation protocol."""
