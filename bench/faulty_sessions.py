"""Sessions through the lab's client-NAT gateway under loss, duplication and reordering on both
of its links, with ftpalg and with the kernel's nf_nat_ftp helper in the same run.

    .venv/bin/python bench/faulty_sessions.py [--sessions 100] [--transfers 5] [--loss 0.05]
                                              [--dup 0.02] [--reorder 0.05] [--mode PORT]   (root)

Faults sit in the end hosts (ftpalg.lab.faults): on the client's and the server's output
(drop, duplicate, hold back) and input (the same), for the control port only, so every
control segment can be lost, doubled or overtaken on its way to and from the gateway.
Prints a table; asserts nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ftpalg.lab.faults import Faults  # noqa: E402
from ftpalg.lab.lab import CLIENTS, SERVERS, Lab, sha256  # noqa: E402

HELPER = ["PREROUTING", "-p", "tcp", "--dport", "21", "-j", "CT", "--helper", "ftp"]


def faults(lab: Lab, args: argparse.Namespace, seed: int) -> contextlib.ExitStack:
    stack = contextlib.ExitStack()
    q = 3100
    for ns in (lab.client, lab.server):
        for chain in ("OUTPUT", "INPUT"):
            stack.enter_context(Faults(ns, drop=args.loss, dup=args.dup, reorder=args.reorder, delay_ms=15,
                                       ports=(21,), chain=chain, queue=q, seed=seed + q))
            q += 1
    return stack


def run(lab: Lab, args: argparse.Namespace, host: str) -> dict[str, object]:
    want = sha256(lab.files / "small.txt")
    res = lab.ns(lab.client, [sys.executable, "-m", "ftpalg.lab.sessions", host, str(args.sessions),
                              str(args.transfers), "8", args.mode, want, CLIENTS[0]], check=False, timeout=3000)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sessions", type=int, default=100)
    ap.add_argument("--transfers", type=int, default=5)
    ap.add_argument("--loss", type=float, default=0.05)
    ap.add_argument("--dup", type=float, default=0.02)
    ap.add_argument("--reorder", type=float, default=0.05)
    ap.add_argument("--mode", default="PORT")
    args = ap.parse_args()
    lab = Lab(f"fb{os.getpid()}")
    rows = []
    try:
        lab.up()
        for server in ("vsftpd", "pyftpdlib"):
            for who in ("kernel", "ftpalg"):
                with faults(lab, args, 7):
                    if who == "kernel":
                        lab.ns(lab.gw, ["iptables", "-t", "raw", "-A", *HELPER])
                        try:
                            r = run(lab, args, SERVERS[server])
                        finally:
                            lab.ns(lab.gw, ["iptables", "-t", "raw", "-D", *HELPER])
                            lab.ns(lab.gw, ["conntrack", "-F"], check=False)
                        counters = ""
                    else:
                        p = lab.start_ftpalg()
                        try:
                            r = run(lab, args, SERVERS[server])
                        finally:
                            lab.stop_ftpalg(p)
                        log = lab.ftpalg_log()
                        c = dict(re.findall(r"(\w+)=(\d+)", log.rsplit("counters:", 1)[-1]))
                        counters = " ".join(f"{k}={c[k]}" for k in ("reordered", "lines_assembled", "held_duplicate",
                                                                     "ahead_duplicate", "gap", "partial_line",
                                                                     "dropped_unreplayable", "seq_compensated")
                                            if k in c)
                rows.append((server, who, r, counters))
    finally:
        lab.down()
    print(f"{args.sessions} sessions x {args.transfers} {args.mode} transfers per server, 8 at a time; "
          f"control segments on both gateway links: {args.loss:.0%} lost, {args.dup:.0%} duplicated, "
          f"{args.reorder:.0%} held back 15 ms (each way, at both ends)")
    print(f"{'server':<10} {'ALG':<7} {'sessions ok':>12} {'transfers ok':>13} {'seconds':>8}  notes")
    for server, who, r, counters in rows:
        print(f"{server:<10} {who:<7} {r['sessions_ok']:>6}/{r['sessions']:<5} {r['transfers_ok']:>6}/"
              f"{r['transfers']:<6} {r['seconds']:>8}  {counters} {'; '.join(map(str, r['failures'][:2]))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
