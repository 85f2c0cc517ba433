"""Many FTP sessions at once from a lab namespace: ``python -m ftpalg.lab.sessions HOST
SESSIONS TRANSFERS WORKERS MODE SHA256 [SOURCE]`` runs SESSIONS control connections (WORKERS at
a time), each doing TRANSFERS downloads of small.txt in MODE, and prints one JSON line:
sessions and transfers that checked out (SHA-256), failures with their reason and when they
came (seconds from the start), seconds, and how long the slowest sessions took (p99, max).
SESSIONS 0: sessions one after another in each of the WORKERS until standard input is closed
(a load that lasts as long as what a test does meanwhile).
Used by tests and bench/ under injected faults; run it with ``ip netns exec``."""

from __future__ import annotations

import hashlib
import json
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from .ftpclient import LabFTP


def session(host: str, transfers: int, mode: str, want: str, source: str | None) -> tuple[int, str, float]:
    """Transfers that checked out, the first failure ('' if none), and the seconds it took."""
    t0 = time.monotonic()
    ok, why = _session(host, transfers, mode, want, source)
    return ok, why, time.monotonic() - t0


def _session(host: str, transfers: int, mode: str, want: str, source: str | None) -> tuple[int, str]:
    ok = 0
    try:
        ftp = LabFTP(mode, timeout=30)
        ftp.connect(host, 21, source_address=(source, 0) if source else None)
        ftp.login()
        for _ in range(transfers):
            h = hashlib.sha256()
            ftp.retrbinary("RETR small.txt", h.update)
            if h.hexdigest() != want:
                return ok, "checksum mismatch"
            ok += 1
        ftp.quit()
    except Exception as e:
        return ok, f"{type(e).__name__}: {e}"
    return ok, ""


def until_eof(workers: int, one: Callable[[], tuple[int, str, float]]) -> list[tuple[int, str, float]]:
    """``one()`` again and again in each of ``workers`` threads until standard input closes."""
    done = threading.Event()
    results: list[tuple[int, str, float]] = []

    def loop() -> None:
        while not done.is_set():
            results.append(one())

    threads = [threading.Thread(target=loop) for _ in range(workers)]
    for t in threads:
        t.start()
    sys.stdin.read()
    done.set()
    for t in threads:
        t.join()
    return results


def main(argv: list[str]) -> int:
    host, n, transfers, workers, mode, want = argv[:6]
    source = argv[6] if len(argv) > 6 else None
    t0 = time.monotonic()

    def one(_: object = None) -> tuple[int, str, float]:
        ok, why, took = session(host, int(transfers), mode, want, source)
        return ok, why and f"{why} (at {time.monotonic() - t0:.1f} s)", took

    if int(n) == 0:
        results = until_eof(int(workers), one)
    else:
        with ThreadPoolExecutor(int(workers)) as pool:
            results = list(pool.map(one, range(int(n))))
    failures = [why for _, why, _ in results if why]
    took = sorted(t for _, _, t in results)
    print(json.dumps({
        "sessions": len(results), "sessions_ok": sum(1 for _, why, _ in results if not why),
        "transfers": len(results) * int(transfers), "transfers_ok": sum(ok for ok, _, _ in results),
        "failures": failures[:10], "seconds": round(time.monotonic() - t0, 2),
        "session_p99_s": round(took[min(len(took) - 1, int(0.99 * len(took)))], 3) if took else None,
        "session_max_s": round(took[-1], 3) if took else None,
    }))
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
