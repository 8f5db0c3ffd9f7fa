"""The one error type users see: it says what is wrong, where, and what to do."""

from __future__ import annotations


class FedrecError(Exception):
    """A user-facing error. The CLI prints it without a traceback and exits with code 2."""

    def __init__(self, message: str, *, hint: str | None = None):
        self.hint = hint
        super().__init__(f"{message}. {hint}" if hint else message)


class DataError(FedrecError):
    """Bad input data, located by file, row and column when known."""

    def __init__(self, message: str, *, file: str | None = None, row: int | None = None,
                 column: str | None = None, hint: str | None = None):
        self.file, self.row, self.column = file, row, column
        where = ", ".join(
            part for part in (
                f"file {file}" if file else "",
                f"row {row}" if row is not None else "",
                f"column {column!r}" if column else "",
            ) if part
        )
        super().__init__(f"{where}: {message}" if where else message, hint=hint)
