"""Many FTP sessions at once from a lab namespace: ``python -m ftpalg.lab.sessions HOST
SESSIONS TRANSFERS WORKERS MODE SHA256 [SOURCE]`` runs SESSIONS control connections (WORKERS at
a time), each doing TRANSFERS downloads of small.txt in MODE, and prints one JSON line:
sessions and transfers that checked out (SHA-256), failures with their reason, seconds, and
how long the slowest sessions took (p99, max).
Used by tests and bench/ under injected faults; run it with ``ip netns exec``."""

from __future__ import annotations

import hashlib
import json
import sys
import time
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


def main(argv: list[str]) -> int:
    host, n, transfers, workers, mode, want = argv[:6]
    source = argv[6] if len(argv) > 6 else None
    t0 = time.monotonic()
    with ThreadPoolExecutor(int(workers)) as pool:
        results = list(pool.map(lambda _: session(host, int(transfers), mode, want, source), range(int(n))))
    failures = [why for _, why, _ in results if why]
    took = sorted(t for _, _, t in results)
    print(json.dumps({
        "sessions": int(n), "sessions_ok": sum(1 for _, why, _ in results if not why),
        "transfers": int(n) * int(transfers), "transfers_ok": sum(ok for ok, _, _ in results),
        "failures": failures[:10], "seconds": round(time.monotonic() - t0, 2),
        "session_p99_s": round(took[min(len(took) - 1, int(0.99 * len(took)))], 3) if took else None,
        "session_max_s": round(took[-1], 3) if took else None,
    }))
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
