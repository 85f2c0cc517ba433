"""A check of ``ftpalg doctor``, as a value: what the live checks (doctor.py) and the trials
(trials.py) return, and what the text and JSON renderers and the exit status read."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

OK, INFO, WARN, FAIL = "ok", "info", "warn", "fail"
STATUSES = (OK, INFO, WARN, FAIL)
EXIT = {OK: 0, INFO: 0, WARN: 3, FAIL: 1}


@dataclass(frozen=True)
class Check:
    """One check's outcome: ``fix`` says what to do (empty when nothing is to be done)."""

    name: str
    status: str
    detail: str
    fix: str = ""


def exit_status(checks: Iterable[Check]) -> int:
    """1 if a check failed, else 3 if one warned, else 0."""
    seen = {c.status for c in checks}
    return 1 if FAIL in seen else 3 if WARN in seen else 0
