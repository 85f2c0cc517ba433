"""The client side of the failover lab (``failover.py``), run inside the lab's client
namespace: ``python -m ftpalg.lab.failover_clients session HOST`` is one control connection
driven on stdin, one JSON answer per line (``failover.FtpSession``);
``python -m ftpalg.lab.failover_clients load HOST SHA256`` is clients looping whole sessions
for a while, to fail over under (``FailoverLab.load``)."""

from __future__ import annotations

import ftplib
import functools
import hashlib
import json
import sys
import threading
import time
from typing import Any


def _take(b: bytes, h: Any, size: list[int]) -> None:
    h.update(b)
    size[0] += len(b)


def _session_main(host: str, timeout: float) -> int:
    from .ftpclient import PASSIVE_MODES, LabFTP

    def say(**kv: Any) -> None:
        print(json.dumps(kv), flush=True)

    ftp = LabFTP("PORT", timeout=timeout)
    try:
        ftp.connect(host, 21)
        ftp.login()
    except Exception as e:
        say(ok=False, error=f"{type(e).__name__}: {e}")
        return 1
    assert ftp.sock is not None
    say(ok=True, local=list(ftp.sock.getsockname()[:2]), welcome=ftp.welcome)
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        try:
            if words[0] == "get":
                mode, fname = words[1], words[2]
                ftp.mode = mode
                ftp.passiveserver = mode in PASSIVE_MODES
                h = hashlib.sha256()
                size = [0]
                t0 = time.monotonic()
                reply = ftp.retrbinary(f"RETR {fname}", functools.partial(_take, h=h, size=size))
                say(ok=True, sha256=h.hexdigest(), bytes=size[0], seconds=time.monotonic() - t0, reply=reply)
            elif words[0] == "noop":
                say(ok=True, reply=ftp.voidcmd("NOOP"))
            elif words[0] == "quit":
                say(ok=True, reply=ftp.quit())
                return 0
            else:
                say(ok=False, error=f"unknown command {words[0]!r}")
        except Exception as e:
            say(ok=False, error=f"{type(e).__name__}: {e}")
    ftp.close()
    return 0


def _one_session(host: str, mode: str, want: str, timeout: float) -> tuple[int, str]:
    """Login, RETR small.txt in ``mode`` (checked by SHA-256), QUIT. A transfer the server
    fails with a 4xx reply (425: the data connection did not come through) is tried again,
    once, on the same control connection. Returns the transfers failed that way and why the
    session was lost ('' if it was not)."""
    from .ftpclient import LabFTP

    ftp = LabFTP(mode, timeout=timeout)
    failed = 0
    try:
        ftp.connect(host, 21)
        ftp.login()
        while True:
            h = hashlib.sha256()
            try:
                ftp.retrbinary("RETR small.txt", h.update)
                break
            except ftplib.error_temp:
                failed += 1
                if failed > 1:
                    raise
        if h.hexdigest() != want:
            return failed, "checksum mismatch"
        ftp.quit()
    except Exception as e:
        local = ftp.sock.getsockname()[1] if ftp.sock is not None else 0
        return failed, f"port {local}: {type(e).__name__}: {e}"
    return failed, ""


def _load_main(host: str, seconds: float, modes: list[str], want: str, timeout: float) -> int:
    """One thread per entry of ``modes`` loops sessions until ``seconds`` have passed; one
    JSON line, per mode: sessions, sessions lost, transfers failed (and tried again), the
    first reasons."""

    stop = time.monotonic() + seconds
    done: dict[str, list[tuple[int, str]]] = {m: [] for m in modes}
    lock = threading.Lock()

    def loop(mode: str) -> None:
        while time.monotonic() < stop:
            res = _one_session(host, mode, want, timeout)
            with lock:
                done[mode].append(res)

    threads = [threading.Thread(target=loop, args=(m,)) for m in modes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps({m: {"sessions": len(r), "lost": sum(1 for _, w in r if w),
                          "transfers_failed": sum(n for n, _ in r), "failures": [w for _, w in r if w][:10]}
                      for m, r in done.items()}), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="ftpalg.lab.failover_clients")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("session", help="one FTP control connection driven on stdin (see FtpSession)")
    s.add_argument("host")
    s.add_argument("--timeout", type=float, default=10.0)
    ld = sub.add_parser("load", help="clients looping sessions (login, RETR small.txt, QUIT) for a while")
    ld.add_argument("host")
    ld.add_argument("sha256", help="of small.txt")
    ld.add_argument("--seconds", type=float, default=10.0)
    ld.add_argument("--modes", default="PORT*8", help="clients per mode, e.g. PORT*8,PASV*2")
    ld.add_argument("--timeout", type=float, default=5.0)
    args = ap.parse_args(argv)
    if args.cmd == "load":
        modes = [m for part in args.modes.split(",") for m, _, n in [part.partition("*")] for _ in range(int(n or 1))]
        return _load_main(args.host, args.seconds, modes, args.sha256, args.timeout)
    return _session_main(args.host, args.timeout)


if __name__ == "__main__":
    sys.exit(main())

