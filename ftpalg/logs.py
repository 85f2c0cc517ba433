"""How ftpalg's log lines look: ``2026-12-07 06:49:22,667 ftpalg INFO bound to NFQUEUE 2121``
on a terminal or in a file; under systemd, whose journal stamps every line itself, without
the time and with the syslog priority prefix journald reads (``<6>ftpalg INFO ...``: ``journalctl
-p warning -u ftpalg`` shows the warnings and errors, ``systemctl status`` highlights them).
ftpalg's standard error is the journal when ``$JOURNAL_STREAM`` names its device and inode
(systemd.exec(5)), also in the workers, which inherit both."""

from __future__ import annotations

import logging
import os
import sys

# syslog priorities of the logging levels (journald's <N> prefix)
PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


def to_journal(fd: int = 2) -> bool:
    """Whether ``fd`` is the stream systemd connected to the journal."""
    dev, _, ino = os.environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        st = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (OSError, ValueError):
        return False


class _Priority(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.priority = PRIORITY.get(record.levelno, 6)
        return True


def setup(level: str, tag: str = "") -> None:
    """Log to standard error at ``level``; ``tag`` before each message (a worker's ``w1 ``)."""
    journal = to_journal()
    fmt = f"{'<%(priority)d>' if journal else '%(asctime)s '}ftpalg %(levelname)s {tag}%(message)s"
    logging.basicConfig(level=level.upper(), stream=sys.stderr, format=fmt)
    if journal:
        for handler in logging.getLogger().handlers:
            handler.addFilter(_Priority())
