"""Gateway side of bench/suite.py, run inside a lab gateway's namespace.

    nullq [--queue N] [--port P] [--all]
        ftpalg's own rules (ftpalg.linux.rules.StaticRules: table inet ftpalg with the ``sane``
        helper, the queue rule; the selection chain as ftpalg's default ``queue = "selected"``
        installs it, every control segment with ``--all``) and a do-nothing NFQUEUE handler that
        accepts every packet,
        with ftpalg's loop (a selector on the queue's socket, ``run(block=False)``): the floor
        of any user-space ALG. Until SIGTERM/SIGINT; the rules are removed on the way out.
    rules-up | rules-down [--queue N] [--port P]
        only install / remove those rules (nothing bound: the queue bypasses).
    pinholes --rounds R < masters.json
        open and close one expectation per control connection (JSON list of
        [client, sport, server, dport, public, public_port]) with ftpalg's own
        LinuxKernel (expect, withdraw) over CtNetlink, timing each call; prints one JSON line.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ftpalg.config import DEFAULT_QUEUE  # noqa: E402
from ftpalg.linux.rules import StaticRules  # noqa: E402


def cmd_nullq(args: argparse.Namespace) -> int:
    from netfilterqueue import NetfilterQueue

    from ftpalg.linux.nfqueue import QUEUE_MAXLEN, queue_selector

    rules = StaticRules([args.port], args.queue, selected=not args.all)
    packets = 0

    def accept(pkt: Any) -> None:
        nonlocal packets
        packets += 1
        pkt.accept()

    try:
        backend = rules.install()
        nfq = NetfilterQueue()
        nfq.bind(args.queue, accept, max_len=QUEUE_MAXLEN)
        try:
            with queue_selector(nfq) as (sel, stopped):
                print(f"rules installed ({backend}); bound to NFQUEUE {args.queue}", flush=True)
                while not stopped:
                    if sel.select(1.0):
                        nfq.run(block=False)
        finally:
            nfq.unbind()
    finally:
        rules.remove()
        print(f"null handler: packets={packets}", flush=True)
    return 0


def cmd_rules(args: argparse.Namespace) -> int:
    rules = StaticRules([args.port], args.queue)
    if args.cmd == "rules-up":
        rules.install()
    else:
        rules.remove()
    return 0


def cmd_pinholes(args: argparse.Namespace) -> int:
    from ftpalg.core.kernel import Pinhole
    from ftpalg.linux.ctnetlink import CtNetlink
    from ftpalg.linux.kernel import LinuxKernel

    masters = json.load(sys.stdin)
    nl = CtNetlink()
    # time spent in netlink round trips (send, the kernel's work, recv), apart from the
    # Python around them (message building in LinuxKernel/CtNetlink)
    # (every request waited for goes through _requests, alone or with others in one sendmsg)
    in_requests = [0, 0, 0]  # ns, requests (messages), waits (sendmsgs waited for)
    real_requests = nl._requests

    def timed_requests(reqs: Any, *args: Any, **kw: Any) -> Any:
        t = time.perf_counter_ns()
        try:
            return real_requests(reqs, *args, **kw)
        finally:
            in_requests[0] += time.perf_counter_ns() - t
            in_requests[1] += len(reqs)
            in_requests[2] += 1

    nl._requests = timed_requests  # type: ignore[method-assign]
    kernel = LinuxKernel(nl, 120.0)
    phs = []
    for i, (client, sport, server, dport, public, public_port) in enumerate(masters):
        key = (ipaddress.ip_address(client).packed, sport, ipaddress.ip_address(server).packed, dport)
        # PORT from the client behind the NAT: the server may connect to public:public_port,
        # sent on to client:public_port (what ftpalg opens for a rewritten PORT)
        phs.append(Pinhole(id=i + 1, peer=server, public=public, public_port=public_port, inside=client,
                           inside_port=public_port, expires=0.0, master=key, active=True, form="PORT"))
    opens: list[int] = []
    closes: list[int] = []
    open_nl: list[int] = []  # of each open: ns inside netlink requests
    close_nl: list[int] = []
    requests = {"open": 0, "close": 0}
    waits = {"open": 0, "close": 0}
    errors: dict[str, int] = {}
    clock = time.perf_counter_ns
    try:
        for _ in range(args.rounds):
            opened = []
            for ph in phs:
                in_requests[:] = [0, 0, 0]
                t = clock()
                try:
                    kernel.expect(ph)
                except Exception as e:
                    why = f"{type(e).__name__}: {e}"
                    errors[why] = errors.get(why, 0) + 1
                    continue
                opens.append(clock() - t)
                open_nl.append(in_requests[0])
                requests["open"] += in_requests[1]
                waits["open"] += in_requests[2]
                opened.append(ph)
            for ph in opened:
                in_requests[:] = [0, 0, 0]
                t = clock()
                kernel.withdraw(ph, used=False)
                closes.append(clock() - t)
                close_nl.append(in_requests[0])
                requests["close"] += in_requests[1]
                waits["close"] += in_requests[2]
    finally:
        nl.close()
    print(json.dumps({"open_ns": opens, "close_ns": closes, "open_netlink_ns": open_nl, "close_netlink_ns": close_nl,
                      "requests_per_open": requests["open"] / max(1, len(opens)),
                      "requests_per_close": requests["close"] / max(1, len(closes)),
                      "waits_per_open": waits["open"] / max(1, len(opens)),
                      "waits_per_close": waits["close"] / max(1, len(closes)),
                      "errors": errors, "close_failures": kernel.close_failures}))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd", choices=["nullq", "rules-up", "rules-down", "pinholes"])
    ap.add_argument("--queue", type=int, default=DEFAULT_QUEUE)
    ap.add_argument("--port", type=int, default=21)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--all", action="store_true", help="nullq: queue every control segment (queue = all)")
    args = ap.parse_args()
    if args.cmd == "nullq":
        return cmd_nullq(args)
    if args.cmd == "pinholes":
        return cmd_pinholes(args)
    return cmd_rules(args)


if __name__ == "__main__":
    sys.exit(main())
