"""The one exception type of the data room: it names the row, the column and the fix."""

from __future__ import annotations

SKIP_HINT = "or pass skip_bad_rows=True (--skip_bad_rows) to skip and count such rows"


class DataError(ValueError):
    """Bad input data. `row` is the row index in the source (before any filtering), `column` the column name."""

    def __init__(self, message: str, *, row: int | None = None, column: str | None = None, fix: str | None = None):
        self.row = row
        self.column = column
        self.reason = message
        self.fix = fix
        where = []
        if row is not None:
            where.append(f"row {row}")
        if column is not None:
            where.append(f"column {column!r}")
        text = (", ".join(where) + ": " if where else "") + message
        if fix:
            text += f" Fix: {fix}"
        super().__init__(text)


class CacheMismatchError(ValueError):
    """A latent/text cache was built with another model, resolution or dataset than the one asked for."""
