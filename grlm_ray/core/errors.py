"""Errors that tell the user what is wrong and where (file, row, field)."""

from __future__ import annotations


class GrlmError(Exception):
    """Base class for every error grlm-ray raises on purpose."""


class ConfigError(GrlmError):
    """A config file or override is invalid."""


class DataError(GrlmError):
    """Input or artifact data violates its contract.

    ``where`` is a file path or URI, ``row`` a 0-based row (or 1-based line for text files, see
    ``line``), ``field`` a column name. All optional, but always given when known.
    """

    def __init__(
        self,
        message: str,
        *,
        where: str | None = None,
        row: int | None = None,
        line: int | None = None,
        field: str | None = None,
    ) -> None:
        self.message, self.where, self.row, self.line, self.field = message, where, row, line, field
        parts = []
        if where:
            parts.append(str(where))
        if line is not None:
            parts.append(f"line {line}")
        if row is not None:
            parts.append(f"row {row}")
        if field:
            parts.append(f"field '{field}'")
        prefix = ", ".join(parts)
        super().__init__(f"{prefix}: {message}" if prefix else message)
