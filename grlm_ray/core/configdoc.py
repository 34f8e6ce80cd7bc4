"""The configuration reference (docs/config.md), generated from the typed configs in ``core/config.py``: every
section and field with its type, default and the comment written beside it in the code. One source of
truth: ``tests/test_configdoc.py`` fails when the committed file differs from what this module writes.

    python -m grlm_ray.core.configdoc > docs/config.md
"""

from __future__ import annotations

import inspect
import io
import json
import textwrap
import tokenize
import types
import typing
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from grlm_ray.core.config import GrlmConfig

HEADER = """# Configuration reference

Generated from `grlm_ray/core/config.py` by `python -m grlm_ray.core.configdoc > docs/config.md` (a test keeps
this file equal to the code). Every verb reads one YAML file (`extends:` merges others first) and typed
`key.sub=value` overrides; an unknown key is an error naming it. Defaults below are what a field is when no
file sets it; the notes are the comments beside each field in the code.
"""


def field_notes(cls: type) -> dict[str, str]:
    """The comments written beside each field of a class (on its line and on comment-only lines right after)."""
    try:
        src = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    notes: dict[str, list[str]] = {}
    current, pending = None, []  # pending: comment lines at the field indentation, for the next field
    tokens = list(tokenize.generate_tokens(io.StringIO(src).readline))
    for k, tok in enumerate(tokens):
        starts_line = k == 0 or tokens[k - 1].type in (tokenize.INDENT, tokenize.NEWLINE, tokenize.NL, tokenize.DEDENT)
        if tok.type == tokenize.NAME and tok.start[1] == 4 and starts_line and k + 1 < len(tokens) \
                and tokens[k + 1].string == ":":
            current = tok.string
            notes[current] = pending
            pending = []
        elif tok.type == tokenize.NAME and tok.start[1] == 4 and starts_line:
            current, pending = None, []  # a method or a decorator: no field after it owns its comments
        elif tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            own_line = starts_line or tokens[k - 1].type == tokenize.NL
            if own_line and tok.start[1] <= 4:
                pending.append(text)  # a comment block above a field describes that field
            elif current is not None:
                notes[current].append(text)  # beside the field, or its continuation further right
    return {name: " ".join(x for x in lines if x) for name, lines in notes.items() if lines}


def _type_name(t: Any) -> str:
    origin = typing.get_origin(t)
    if origin is typing.Literal:
        return " \\| ".join(repr(a) for a in typing.get_args(t))
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type_name(a) for a in typing.get_args(t))
    if origin is typing.Annotated:
        return _type_name(typing.get_args(t)[0])
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(t))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if t is type(None):
        return "None"
    return getattr(t, "__name__", str(t))


def _default(field: Any) -> str:
    if field.default is PydanticUndefined:
        if field.default_factory is not None:
            value = field.default_factory()
        else:
            return "(required)"
    else:
        value = field.default
    if isinstance(value, BaseModel):
        return "(section)"
    return "`" + json.dumps(value, default=lambda o: o.model_dump(mode="json") if isinstance(o, BaseModel) else str(o)) + "`"


def _models_in(t: Any) -> list[type]:
    """Config classes a field's type holds (a nested section, or the members of a union such as sources)."""
    if isinstance(t, type) and issubclass(t, BaseModel):
        return [t]
    out: list[type] = []
    for a in typing.get_args(t):
        out += _models_in(a)
    return out


def _section(path: str, cls: type, out: list[str], seen: set[tuple[str, type]]) -> None:
    if (path, cls) in seen:
        return
    seen.add((path, cls))
    out.append(f"\n## `{path}` ({cls.__name__})\n")
    doc = inspect.getdoc(cls)
    if doc and doc != inspect.getdoc(BaseModel) and not doc.startswith("!!!"):
        out.append(" ".join(doc.split()) + "\n")
    notes = field_notes(cls)
    out.append("| field | type | default | notes |\n|---|---|---|---|")
    nested: list[tuple[str, type]] = []
    for name, field in cls.model_fields.items():
        models = _models_in(field.annotation)
        note = notes.get(name, "").replace("|", "\\|")
        out.append(f"| `{name}` | {_type_name(field.annotation)} | {_default(field)} | {note} |")
        for m in models:
            key = f"{path}.{name}" if len(models) == 1 else f"{path}.{name} ({m.__name__})"
            if typing.get_origin(field.annotation) is dict:
                key = f"{path}.{name}.<name> ({m.__name__})"
            nested.append((key, m))
    for key, m in nested:
        _section(key, m, out, seen)


def reference() -> str:
    out = [HEADER]
    seen: set[tuple[str, type]] = set()
    for name, field in GrlmConfig.model_fields.items():
        _section(name, field.annotation, out, seen)
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    import sys

    sys.stdout.write(reference())
