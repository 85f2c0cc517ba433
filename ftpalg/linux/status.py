"""``ftpalg status``: the running process's tracked control connections and open pinholes,
served as one JSON document per connection on a local unix socket, off the packet path
(a thread of its own; the snapshot copies the core's tables, which is atomic under the GIL).

The socket is abstract by default (``@ftpalg-status``): it exists once per network namespace,
like the process it belongs to, and vanishes with it. Abstract sockets have no file
permissions, so the server checks its peer's credentials (SO_PEERCRED): root and the uid
ftpalg runs as may read; anyone else is turned away.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

log = logging.getLogger("ftpalg")

Document = dict[str, Any]  # what ``ftpalg status`` reads: JSON (the core's snapshot, or the workers' merged)
DEFAULT_SOCKET = "@ftpalg-status"
TIMEOUT = 5.0


def sockaddr(name: str) -> str | bytes:
    """``@name`` is an abstract socket name, anything else a path."""
    return b"\0" + name[1:].encode() if name.startswith("@") else name


class StatusServer:
    """Answers each connection with ``snapshot()`` as JSON, then closes it."""

    def __init__(self, name: str, snapshot: Callable[[], Document]) -> None:
        self.name = name
        self.snapshot = snapshot
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.bind(sockaddr(name))
        except OSError as e:
            self.sock.close()
            raise OSError(f"status socket {name}: {e.strerror or e}") from None
        self.sock.listen(8)
        self._thread = threading.Thread(target=self._serve, name="ftpalg-status", daemon=True)
        self._stopped = False

    def start(self) -> None:
        self._thread.start()
        log.info("status on unix socket %s (ftpalg status)", self.name)

    def _serve(self) -> None:
        while not self._stopped:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed by stop()
            with conn:
                try:
                    self._answer(conn)
                except Exception as e:  # a status reader must never hurt the process
                    log.warning("status request failed: %s", e)

    def _answer(self, conn: socket.socket) -> None:
        conn.settimeout(TIMEOUT)
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _, uid, _ = struct.unpack("3i", creds)
        if uid not in (0, os.getuid()):
            conn.sendall(b'{"error": "permission denied: root or the uid ftpalg runs as only"}\n')
            return
        body = dict(self.snapshot())
        body["pid"] = os.getpid()
        conn.sendall(json.dumps(body).encode() + b"\n")

    def stop(self) -> None:
        self._stopped = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        if not self.name.startswith("@"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.name)
        self._thread.join(timeout=2)


def fetch(name: str = DEFAULT_SOCKET, timeout: float = TIMEOUT) -> Document:
    """Ask a running ftpalg (in this network namespace) for its status."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(sockaddr(name))
        except OSError as e:
            raise OSError(f"no ftpalg run answers on {name} in this network namespace ({e.strerror or e})") from None
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    doc: Document = json.loads(b"".join(chunks))
    if "error" in doc:
        raise OSError(str(doc["error"]))
    return doc


def render(doc: Document) -> str:
    """The human view: connections, pinholes, a few counters."""
    lines = [f"ftpalg pid {doc.get('pid')}: {doc['tracked']} control connections tracked, "
             f"{len(doc['pinholes'])} pinholes open, {doc['held_bytes']} bytes held",
             ""]
    if doc.get("workers"):
        lines[-1:-1] = [", ".join(f"worker {w['index']} (pid {w['pid']}, queue {w['queue']}): "
                                  + (f"{w['flows']} connections, {w['packets']} packets" if w["answered"]
                                     else "did not answer") for w in doc["workers"])]
    head: tuple[str, ...] = ("CLIENT", "SEEN AS", "DIALED", "SERVER", "USER", "LAST", "CMDS", "CORRECTIONS",
                             "PINHOLE", "IDLE")
    rows: list[tuple[str, ...]] = []
    for f in sorted(doc["flows"], key=lambda f: f["idle"]):
        corr = "/".join("-" if a is None else f"{a['before']:+d}>{a['after']:+d}" for a in f["corrections"])
        flags = (" tls" if f["encrypted"] else "") + (" closing" if f["closing"] else "")
        x = f.get("nat64")
        if x is not None:  # an IPv6 client, seen as its translator's pool address
            flags += " nat64" + ("" if x["enabled"] else "-off")
        client = f["client"] if x is None else f"{f['client']} ({x['client6'] or 'IPv6'})"
        rows.append((client, f["client_seen"] or "?", f["public"], f["server"] or "?", f["user"] or "-",
                     (f["last_command"] or "-") + flags, str(f["commands"]), corr,
                     "-" if f["pinhole"] is None else _pinhole(f["pinhole"], f), f"{f['idle']}s"))
    lines += _table(head, rows) or ["(no control connections)"]
    lines.append("")
    head = ("PINHOLE", "FORM", "FROM", "TO", "DNAT", "SNAT", "EXPIRES", "CONTROL")
    rows = [(_pinhole(p["id"], p), p["form"], p["from"], p["to"], p["dnat"] or "-", p["snat"] or "-",
             f"{p['expires_in']}s", p["control"]) for p in sorted(doc["pinholes"], key=lambda p: p["id"])]
    lines += _table(head, rows) or ["(no pinholes open)"]
    c = doc["counters"]
    keys = ("packets", "flows", "rewrites", "pinholes_opened", "pinholes_used", "pinholes_expired", "refused",
            "unsolicited", "malformed", "faults")
    lines += ["", "counters: " + " ".join(f"{k}={c.get(k, 0)}" for k in keys)]
    xlat = {k.removeprefix("nat64_"): n for k, n in sorted(c.items()) if k.startswith("nat64_")}
    if xlat:
        lines.append("nat64 translations: " + " ".join(f"{k}={n}" for k, n in xlat.items()))
    return "\n".join(lines)


def _pinhole(n: int, entry: dict[str, Any]) -> str:
    """A pinhole's name: #id, with several workers w<index>#id (each counts its own)."""
    return f"w{entry['worker']}#{n}" if "worker" in entry else f"#{n}"


def _table(head: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> list[str]:
    if not rows:
        return []
    widths = [max(len(str(r[i])) for r in (head, *rows)) for i in range(len(head))]
    return ["  ".join(str(v).ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in (head, *rows)]


def wait_for(name: str, timeout: float = 10.0) -> Document:
    """Poll until a status answer comes (tests, scripts)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return fetch(name)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
