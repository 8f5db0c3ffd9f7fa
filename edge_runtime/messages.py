"""fedrec's log messages shown as a command's own output (`fedrec`, `fedrec-edge`); standard
library only, so a command sets it up before anything heavy is imported."""

from __future__ import annotations

import logging


class _Printed(logging.Handler):
    """Prints to `sys.stdout` as it is at each message, not as it was at set-up (a test's
    CliRunner swaps it)."""

    def emit(self, record: logging.LogRecord) -> None:
        print(self.format(record), flush=True)


def print_messages(prefix: str = "") -> None:
    """Show fedrec's messages as a command's own output: the message after `prefix` on stdout,
    from INFO up. Not propagated to the root logger, so a handler a library put there does not
    repeat them. Set up once per process however often it is called."""
    fedrec = logging.getLogger("fedrec")
    if not any(isinstance(h, _Printed) for h in fedrec.handlers):
        handler = _Printed()
        handler.setFormatter(logging.Formatter(prefix.replace("%", "%%") + "%(message)s"))
        fedrec.addHandler(handler)
    fedrec.setLevel(logging.INFO)
    fedrec.propagate = False
