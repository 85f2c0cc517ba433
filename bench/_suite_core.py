"""In-process measurements of ftpalg's pure core for bench/suite.py (no root, no kernel):
``ftpalg.core.alg.Alg`` driven as the queue loop drives it (tests/alg_helpers.py: FastConn,
Driven, FakeKernel — the offline kernel). Each command prints one JSON line.

    cost --packets N             µs per Alg.handle call: no-command packets of a flow without
                                 corrections, a PORT rewritten, a reply on a corrected flow
    memory --conns N [--trace]   bytes the Alg keeps per tracked control connection (handshake,
                                 greeting and one command each): RSS delta, or with --trace
                                 tracemalloc (a separate run: tracing inflates RSS)
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from ftpalg.core.alg import Alg  # noqa: E402

helpers: Any = importlib.import_module("alg_helpers")  # tests/, untyped


class Timed:
    """Wraps ``alg.handle``: records the time of each call while ``on``."""

    def __init__(self, alg: Alg) -> None:
        self.real = alg.handle
        self.on = False
        self.ns: list[int] = []
        alg.handle = self  # type: ignore[method-assign]

    def __call__(self, raw: bytes, now: float, token: object = None) -> Any:
        if not self.on:
            return self.real(raw, now, token)
        t = time.perf_counter_ns()
        out = self.real(raw, now, token)
        self.ns.append(time.perf_counter_ns() - t)
        return out

    def take(self) -> list[int]:
        out, self.ns = self.ns, []
        return out


def summary(ns: list[int]) -> dict[str, Any]:
    s = sorted(ns)
    return {"n": len(s), "median_us": statistics.median(s) / 1e3, "mean_us": statistics.fmean(s) / 1e3,
            "p99_us": s[min(len(s) - 1, int(len(s) * 0.99))] / 1e3}


def logged_in() -> tuple[Alg, Timed, Any]:
    """A core with the test fakes, its timer (off), and a control connection past login."""
    nat = helpers.FakeKernel()
    alg = helpers.Driven(nat)
    timer = Timed(alg)
    conn = helpers.FastConn(alg, nat)
    conn.s(b"220 (vsFTPd 3.0.3)\r\n")
    conn.c(b"USER anonymous\r\n")
    conn.s(b"230 Login successful.\r\n")
    return alg, timer, conn


def cmd_cost(args: argparse.Namespace) -> dict[str, Any]:
    n = args.packets
    out: dict[str, Any] = {}
    # fast path: NOOP / 200 on a flow whose streams were never corrected
    alg, timer, conn = logged_in()
    for _ in range(200):  # warm-up
        conn.c(b"NOOP\r\n")
        conn.s(b"200 NOOP ok.\r\n")
    timer.on = True
    cmd_ns, reply_ns = [], []
    for _ in range(n):
        conn.c(b"NOOP\r\n")
        cmd_ns += timer.take()
        conn.s(b"200 NOOP ok.\r\n")
        reply_ns += timer.take()
    out["fast_client_line"] = summary(cmd_ns)
    out["fast_server_reply"] = summary(reply_ns)
    out["fast_counters"] = {k: alg.counters[k] for k in ("packets", "rewrites")}
    # rewrite path: PORT 10,0,0,2,... rewritten to the public address (longer: seq corrected),
    # a pinhole opened through the fake backend; then the server's 200 on the corrected flow
    alg, timer, conn = logged_in()
    port_ns, corrected_ns = [], []
    for i in range(200 + n):
        timer.on = i >= 200
        p = 40000 + i % 2000
        conn.c(f"PORT 10,0,0,2,{p >> 8},{p & 0xFF}\r\n".encode())
        port_ns += timer.take()
        conn.s(b"200 PORT command successful. Consider using PASV.\r\n")
        corrected_ns += timer.take()
    out["rewrite_port"] = summary(port_ns)
    out["corrected_server_reply"] = summary(corrected_ns)
    out["rewrite_counters"] = {k: alg.counters[k] for k in ("packets", "rewrites", "pinholes_opened",
                                                             "pinholes_closed")}
    out["rewrite_ok"] = alg.counters["rewrites"] == 200 + n
    return out


def rss_bytes() -> int:
    m = re.search(r"^VmRSS:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    return int(m.group(1)) * 1024 if m else 0


def cmd_memory(args: argparse.Namespace) -> dict[str, Any]:
    import tracemalloc

    n = args.conns
    gc.collect()
    if args.trace:
        tracemalloc.start()
    before_rss = rss_bytes()
    before_traced = tracemalloc.get_traced_memory()[0] if args.trace else 0
    nat = helpers.FakeKernel()
    alg = helpers.Driven(nat)
    conns = []
    for i in range(n):
        a = f"10.0.{2 + i // 50000}.{2 + (i // 25000) % 2}"
        port = 20000 + i % 25000
        conn = helpers.FastConn(alg, nat, client=(a, port), public=("203.0.113.1", port))
        conn.s(b"220 (vsFTPd 3.0.3)\r\n")
        conn.c(b"USER anonymous\r\n")
        conns.append(conn)
    # keep only what the Alg keeps: the driver's connections and the fake conntrack go
    del conns, conn
    nat.table.clear()
    nat.adj.clear()
    gc.collect()
    out: dict[str, Any] = {"conns": n, "tracked": alg.tracked, "max_flows": alg.limits.max_flows,
                           "syns_pending": len(alg.syns), "counters": dict(alg.counters)}
    if args.trace:
        traced = tracemalloc.get_traced_memory()[0] - before_traced
        snap = tracemalloc.take_snapshot()
        tracemalloc.stop()
        by_file = snap.statistics("filename")
        out["traced_bytes"] = traced
        out["bytes_per_conn"] = traced / max(1, alg.tracked)
        out["top_files"] = [{"file": str(s.traceback[0].filename).replace(str(ROOT) + "/", ""), "bytes": s.size}
                            for s in by_file[:6]]
        lines = snap.statistics("lineno")
        out["top_lines"] = [{"where": f"{str(s.traceback[0].filename).replace(str(ROOT) + '/', '')}:"
                                      f"{s.traceback[0].lineno}", "bytes": s.size} for s in lines[:8]]
    else:
        rss = rss_bytes() - before_rss
        out["rss_delta_bytes"] = rss
        out["bytes_per_conn"] = rss / max(1, alg.tracked)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("cost")
    c.add_argument("--packets", type=int, default=5000)
    m = sub.add_parser("memory")
    m.add_argument("--conns", type=int, default=10000)
    m.add_argument("--trace", action="store_true")
    args = ap.parse_args()
    print(json.dumps(cmd_cost(args) if args.cmd == "cost" else cmd_memory(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
