"""Log lines on a terminal or in a file (with the time) and in systemd's journal (without it,
with the syslog priority prefix journald reads): ftpalg/logs.py."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

PROGRAM = """
import logging, sys
from ftpalg import logs
logs.setup("info", sys.argv[1])
log = logging.getLogger("ftpalg")
log.debug("not shown")
log.info("bound to NFQUEUE 2121")
log.warning("a warning")
log.error("an error")
"""


def lines(tmp_path: Path, journal: bool, tag: str = "") -> list[str]:
    out = tmp_path / "stderr"
    with out.open("wb") as f:
        st = os.fstat(f.fileno())
        env = {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}" if journal else "1:2"}
        subprocess.run([sys.executable, "-c", PROGRAM, tag], stderr=f, env=env, check=True, timeout=30)
    return out.read_text().splitlines()


def test_in_a_file_each_line_has_the_time(tmp_path):
    got = lines(tmp_path, journal=False)
    assert [re.sub(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ", "", line) for line in got] == [
        "ftpalg INFO bound to NFQUEUE 2121", "ftpalg WARNING a warning", "ftpalg ERROR an error"], got


def test_in_the_journal_each_line_has_its_priority_and_no_time(tmp_path):
    assert lines(tmp_path, journal=True, tag="w1 ") == [
        "<6>ftpalg INFO w1 bound to NFQUEUE 2121", "<4>ftpalg WARNING w1 a warning", "<3>ftpalg ERROR w1 an error"]
