"""Benchmark: active-mode sessions through the lab gateway, kernel nf_nat_ftp vs ftpalg,
measured in the same run; plus the core's cost per control packet.

    .venv/bin/python bench/active_sessions.py [--sessions N]      (root)

Prints numbers; asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import textwrap
import timeit
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from ftpalg.lab.lab import SERVERS, Lab  # noqa: E402

CLIENT = """
    import sys, time, json
    sys.path.insert(0, {root!r})
    from ftpalg.lab.ftpclient import ActiveFTP
    times = []
    t0 = time.perf_counter()
    for i in range({n}):
        t = time.perf_counter()
        ftp = ActiveFTP(eprt=False, data_port=0, timeout=10)
        ftp.connect({host!r}, 21)
        ftp.login()
        ftp.retrbinary("RETR small.txt", lambda b: None)
        ftp.quit()
        times.append(time.perf_counter() - t)
    print(json.dumps({{"total": time.perf_counter() - t0, "times": times}}))
"""


def sessions(lab: Lab, n: int, host: str) -> tuple[float, float, float]:
    import json

    code = textwrap.dedent(CLIENT.format(root=str(ROOT), n=n, host=host))
    res = lab.ns(lab.client, [sys.executable, "-c", code], timeout=600)
    data = json.loads(res.stdout)
    ts = sorted(data["times"])
    return n / data["total"], statistics.median(ts) * 1e3, ts[int(len(ts) * 0.95) - 1] * 1e3


def core_cost() -> float:
    from alg_helpers import Conn, Driven, FakeKernel

    nat = FakeKernel()
    alg = Driven(nat)
    conn = Conn(alg, nat)
    conn.c(b"PORT 10,0,0,2,195,80\r\n")
    conn.s(b"200 ok\r\n")
    raw = conn.last_in  # a server reply whose ack needs correcting
    n = 20000
    return timeit.timeit(lambda: alg.handle(raw, 0.0), number=n) / n * 1e6


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sessions", type=int, default=200)
    args = ap.parse_args()
    lab = Lab(f"fb{os.getpid()}")
    rows = []
    try:
        lab.up()
        for server, host in SERVERS.items():
            lab.ns(lab.gw, ["iptables", "-t", "raw", "-A", "PREROUTING", "-p", "tcp", "--dport", "21",
                            "-j", "CT", "--helper", "ftp"])
            k = sessions(lab, args.sessions, host)
            lab.ns(lab.gw, ["iptables", "-t", "raw", "-D", "PREROUTING", "-p", "tcp", "--dport", "21",
                            "-j", "CT", "--helper", "ftp"])
            p = lab.start_ftpalg()
            try:
                u = sessions(lab, args.sessions, host)
            finally:
                lab.stop_ftpalg(p)
            rows.append((server, k, u))
    finally:
        lab.down()
    print(f"{args.sessions} sequential active-mode sessions (login, PORT, RETR 1000 B, QUIT) per server")
    print(f"{'server':<10} {'':<8} {'sessions/s':>10} {'median ms':>10} {'p95 ms':>8}")
    for server, k, u in rows:
        print(f"{server:<10} {'kernel':<8} {k[0]:>10.1f} {k[1]:>10.2f} {k[2]:>8.2f}")
        print(f"{'':<10} {'ftpalg':<8} {u[0]:>10.1f} {u[1]:>10.2f} {u[2]:>8.2f}   "
              f"ratio ftpalg/kernel: {u[0] / k[0]:.2f}x sessions/s, +{u[1] - k[1]:.2f} ms median")
    print(f"core cost per corrected control packet (no I/O): {core_cost():.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
