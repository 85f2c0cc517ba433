"""What a test needs from the machine, and what happens when it is missing.

``need(cond, what)`` at the top of a test or fixture: when ``cond`` is false the test is
skipped, naming ``what`` it needs, except in CI (the environment variable ``CI`` is set,
as CI services do: ``CI=true bash .ci/run``), where it FAILS: CI runs ``./dev.sh test`` as
root, which installs everything the suite uses, so a missing part there means the test did
not run, and a green run must not hide that. Every environment skip in the suite goes
through here; conftest.py also turns any other skip into a failure in CI.
"""

from __future__ import annotations

import os

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def need(cond: object, what: str) -> None:
    """Skip the test (fail it in CI) unless ``cond``; ``what``: what it needs, e.g.
    ``"setpriv (util-linux)"``."""
    __tracebackhide__ = True  # the skip or failure is reported at the caller
    if cond:
        return
    if in_ci():
        pytest.fail(f"in CI (CI={os.environ['CI']}) a missing part fails instead of skipping: needs {what}",
                    pytrace=False)
    pytest.skip(f"needs {what}")
