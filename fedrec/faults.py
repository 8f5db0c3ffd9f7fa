"""Freeze points: where fault-injection tests stop a real process to kill it or let it hang.

A process started with FEDREC_FREEZE_AT=<stage> that reaches that stage writes a marker
(FEDREC_FREEZE_FILE: stage, where, pid) and stops making progress, as a hung machine would,
until the marker is deleted; it freezes once per marker. The test decides: kill the process
there, or let the server time it out and then thaw it. Without the variable a freeze point does
nothing.
"""

from __future__ import annotations

import os
import time

from fedrec.atomic import write_json

STAGES = ("before-training", "mid-training", "after-ledger", "while-sending")


def freeze_point(stage: str, where: str = "") -> None:
    if os.environ.get("FEDREC_FREEZE_AT") != stage:
        return
    marker = os.environ.get("FEDREC_FREEZE_FILE")
    if not marker:
        while True:
            time.sleep(3600)
    try:
        os.close(os.open(marker + ".reached", os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return
    write_json(marker, {"stage": stage, "where": where, "pid": os.getpid()})
    while os.path.exists(marker):
        time.sleep(0.2)
