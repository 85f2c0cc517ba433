"""The audit log: one line per transfer command answered, opt-in.

Each line is ``ftpalg AUDIT {json}`` on the log stream (journald under systemd: one journal
entry each, searchable with ``journalctl -u ftpalg -g AUDIT``), or the bare JSON object per
line appended to a file of the admin's choice (JSON Lines). Fields: ``time`` (UTC, ISO
8601), ``client``, ``server`` (real address:port), ``server_public`` (the address the client
used, when the server is behind DNAT), ``user``, ``command`` (RETR, STOR, LIST, ...),
``path``, ``mode`` (the announcement that set up the data connection: PORT, EPRT, LPRT,
PASV, EPSV, LPSV; empty if ftpalg saw none), ``data`` (who connected where, through which
translation), ``code`` and ``reply`` (the server's final reply) and ``outcome`` (ok: 2xx).
Paths and user names are at most 256 bytes, decoded as UTF-8 with replacement characters.
"""

from __future__ import annotations

import datetime
import json
import logging
from collections.abc import Callable
from typing import IO

log = logging.getLogger("ftpalg.audit")


class AuditSink:
    """A callable for ``Alg(on_transfer=...)``."""

    def __init__(self, path: str = "") -> None:
        self.path = path
        self._file: IO[str] | None = open(path, "a", buffering=1, encoding="utf-8") if path else None  # noqa: SIM115

    def __call__(self, record: dict[str, object]) -> None:
        line = {"time": datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds"), **record}
        text = json.dumps(line, ensure_ascii=False, separators=(", ", ": "))
        if self._file is not None:
            self._file.write(text + "\n")
        else:
            log.info("AUDIT %s", text)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def sink(enabled: bool, path: str = "") -> tuple[Callable[[dict[str, object]], None] | None, AuditSink | None]:
    """The ``on_transfer`` callable (None when auditing is off) and what to close on exit."""
    if not enabled:
        return None, None
    s = AuditSink(path)
    return s, s
