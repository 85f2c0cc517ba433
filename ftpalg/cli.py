"""Command line: ``ftpalg run | demo | lab up/down | rules``."""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import socket
import sys
from collections.abc import Iterator
from types import FrameType
from typing import Any

from . import __version__
from .linux.rules import DEFAULT_QUEUE, RuleError

log = logging.getLogger("ftpalg")


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


LOCK_NAME = b"\0ftpalg-run"  # an abstract unix socket name: one per network namespace


@contextlib.contextmanager
def single_instance() -> Iterator[None]:
    """One ``ftpalg run`` per network namespace: a second one would remove the first one's
    rules when it exits. The lock is a socket bound to an abstract name, which lives in the
    network namespace: no file to create (no root-owned directory needed), and the kernel
    frees it when the process ends, however it ends."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            sock.bind(LOCK_NAME)
        except OSError:
            raise RuleError("another ftpalg run is active in this network namespace "
                            "(it holds the abstract socket @ftpalg-run)") from None
        yield
    finally:
        sock.close()


def cmd_run(args: argparse.Namespace) -> int:
    # SIGTERM during set-up must still clean up (the loop installs its own handler later).
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        with single_instance():
            return _serve(args)
    except (RuleError, OSError) as e:
        log.error("%s", e)
        return 1


def _serve(args: argparse.Namespace) -> int:
    from .core.table import Alg
    from .linux.conntrack import Conntrack, ExpectationPinholes
    from .linux.ctnetlink import CtNetlink
    from .linux.nfqueue import QueueHandler
    from .linux.rules import StaticRules, queue_chains_present

    ports = frozenset(args.control_port or [21])
    if args.no_rules and not queue_chains_present():
        raise RuleError("--no-rules: table inet ftpalg or its queue rule is missing; "
                        "load deploy/ftpalg.nft and deploy/queue.iptables (or deploy/ftpalg-queue.nft) first")
    rules = None if args.no_rules else StaticRules(ports, args.queue_num, args.queue_backend)
    installed = False
    nl = CtNetlink()
    holes = ExpectationPinholes(nl, args.pinhole_timeout)
    alg = Alg(Conntrack(nl), holes, ports, args.pinhole_timeout, limits=limits(args))
    try:
        if rules is not None:
            backend = rules.install()  # a partial install is undone by remove() below all the same
            installed = True
            log.info("rules installed: queue via %s, control ports %s, queue %d",
                     backend, ",".join(map(str, sorted(ports))), args.queue_num)
        QueueHandler(alg, args.queue_num).run()
    except KeyboardInterrupt:
        log.info("interrupted")
    except (RuleError, OSError) as e:
        log.error("%s", e)
        return 1
    finally:
        alg.shutdown()  # deletes the expectations still open; corrections stay with the kernel
        nl.close()
        if rules is not None:
            rules.remove()
            if installed:
                log.info("rules removed")
        stats = " ".join(f"{k}={v}" for k, v in sorted(alg.counters.items()))
        log.info("counters: %s", stats or "none")
    return 0


def limits(args: argparse.Namespace) -> Any:
    from .core.policy import Limits

    try:
        return Limits(args.min_port, args.max_flows, args.max_pinholes, args.max_pinholes_per_client,
                      args.max_held_bytes)
    except ValueError as e:
        raise RuleError(str(e)) from None


def cmd_demo(args: argparse.Namespace) -> int:
    from .lab.demo import main

    signal.signal(signal.SIGTERM, _interrupt)
    return main(args.prefix)


def cmd_lab(args: argparse.Namespace) -> int:
    from .lab.lab import Lab

    lab = Lab(args.prefix)
    if args.action == "faults":
        return _lab_faults(lab, args)
    if args.action == "up":
        lab.up(servers=not args.no_servers)
        lab.procs.clear()  # servers keep running; `ftpalg lab down` stops them
        print(f"lab up: namespaces {', '.join(lab.namespaces)}; run ftpalg with:\n"
              f"  ip netns exec {lab.gw} .venv/bin/ftpalg run")
    else:
        lab.down()
        print("lab down")
    return 0


def _lab_faults(lab: Any, args: argparse.Namespace) -> int:
    """Loss, duplication and reordering on both links of the lab's gateway (in the client's
    and the servers' namespace, both ways) until Ctrl-C or SIGTERM."""
    from .lab.faults import Faults

    if not lab.exists():
        raise RuleError(f"no lab with prefix {args.prefix}: run `ftpalg lab up` first")
    signal.signal(signal.SIGTERM, _interrupt)
    injected = []
    with contextlib.ExitStack() as stack:
        q = 3100
        for ns in (lab.client, lab.server):
            for chain in ("OUTPUT", "INPUT"):
                injected.append(stack.enter_context(Faults(
                    ns, drop=args.loss, dup=args.dup, reorder=args.reorder, delay_ms=args.delay_ms,
                    ports=tuple(args.port or ()), chain=chain, queue=q, seed=args.seed + q)))
                q += 1
        print(f"faults on: {args.loss:.0%} lost, {args.dup:.0%} duplicated, {args.reorder:.0%} held back "
              f"{args.delay_ms:g} ms, both ways on both links of {lab.gw}"
              f"{' (ports ' + ','.join(map(str, args.port)) + ')' if args.port else ''}; Ctrl-C ends them",
              flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()
    for f in injected:
        print(f"{f.ns} {' '.join(f'{k}={v}' for k, v in sorted(f.counters.items()))}")
    return 0


def cmd_rules(args: argparse.Namespace) -> int:
    from .linux.rules import iptables_queue_rules, nft_rules

    ports = args.control_port or [21]
    text = {
        "nft": lambda: nft_rules(ports),
        "nft-queue": lambda: nft_rules(ports, args.queue_num),
        "queue-iptables": lambda: iptables_queue_rules(ports, args.queue_num, 4),
        "queue-ip6tables": lambda: iptables_queue_rules(ports, args.queue_num, 6),
    }[args.part]()
    sys.stdout.write(text)
    return 0


def _bounded(lo: int, hi: int, what: str) -> Any:
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be a number, not {text!r}") from None
        if not lo <= n <= hi:
            raise argparse.ArgumentTypeError(f"{what} {n} not in {lo}..{hi}")
        return n
    return parse


port_number = _bounded(1, 65535, "port")
queue_number = _bounded(0, 65535, "queue number")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ftpalg", description="FTP-aware NAT application-level gateway")
    ap.add_argument("--version", action="version", version=__version__)
    ap.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sub = ap.add_subparsers(dest="cmd", required=True)

    def ports_and_queue(p: argparse.ArgumentParser) -> None:
        p.add_argument("--control-port", type=port_number, action="append", metavar="PORT",
                       help="FTP control port to watch (repeatable; default 21)")
        p.add_argument("--queue-num", type=queue_number, default=DEFAULT_QUEUE,
                       help=f"NFQUEUE number (default {DEFAULT_QUEUE})")

    r = sub.add_parser("run", help="run the ALG on this gateway")
    ports_and_queue(r)
    r.add_argument("--pinhole-timeout", type=float, default=120.0, metavar="SECONDS",
                   help="forget an unused pinhole (expectation) after this long (default 120)")
    lim = r.add_argument_group("policy and limits (see README, Security model)")
    lim.add_argument("--min-port", type=port_number, default=1024, metavar="PORT",
                     help="never open a pinhole to a port below this (default 1024; 1 allows any)")
    lim.add_argument("--max-flows", type=int, default=16384, metavar="N",
                     help="control connections tracked at once; at the cap the least recently seen idle "
                          "ones are forgotten (default 16384)")
    lim.add_argument("--max-pinholes", type=int, default=4096, metavar="N",
                     help="live pinholes in total; beyond, announcements open nothing (default 4096)")
    lim.add_argument("--max-pinholes-per-client", type=int, default=64, metavar="N",
                     help="live pinholes of one FTP client address (default 64)")
    lim.add_argument("--max-held-bytes", type=int, default=1 << 20, metavar="BYTES",
                     help="segments held back for split lines or reordering, in total (default 1 MiB)")
    r.add_argument("--no-rules", action="store_true",
                   help="do not install/remove table inet ftpalg and the queue rule (load deploy/ files yourself)")
    r.add_argument("--queue-backend", choices=["auto", "nft", "iptables"], default="auto",
                   help="how to queue control packets (auto: nft queue if the kernel has it)")
    r.add_argument("--log-level", default=argparse.SUPPRESS, choices=["debug", "info", "warning", "error"])
    r.set_defaults(func=cmd_run)

    d = sub.add_parser("demo", help="lab demo: active-mode FTP through NAT without and with ftpalg")
    d.add_argument("--prefix", default="ftpalg-demo", help="name prefix of the lab's namespaces")
    d.set_defaults(func=cmd_demo)

    lab = sub.add_parser("lab", help="build or remove the namespace lab")
    lab.add_argument("action", choices=["up", "down", "faults"],
                     help="faults: loss, duplication and reordering on the gateway's links until Ctrl-C")
    lab.add_argument("--prefix", default="ftpalg", help="name prefix of the lab's namespaces")
    lab.add_argument("--no-servers", action="store_true", help="do not start the FTP servers")
    lab.add_argument("--loss", type=float, default=0.05, help="faults: share of segments lost (default 0.05)")
    lab.add_argument("--dup", type=float, default=0.02, help="faults: share duplicated (default 0.02)")
    lab.add_argument("--reorder", type=float, default=0.05, help="faults: share held back (default 0.05)")
    lab.add_argument("--delay-ms", type=float, default=15.0, help="faults: how long one is held back")
    lab.add_argument("--port", type=int, action="append", help="faults: only these TCP ports (repeatable)")
    lab.add_argument("--seed", type=int, default=0, help="faults: seed of the random decisions")
    lab.set_defaults(func=cmd_lab)

    ru = sub.add_parser("rules", help="print the static rules `ftpalg run` installs (deploy/ files)")
    ru.add_argument("part", choices=["nft", "nft-queue", "queue-iptables", "queue-ip6tables"],
                    help="nft: table inet ftpalg (helper, nat chains; nft -f); nft-queue: the same with the "
                         "queue rule, for kernels with nft queue; queue-iptables / queue-ip6tables: the queue rule "
                         "for iptables-restore / ip6tables-restore")
    ports_and_queue(ru)
    ru.set_defaults(func=cmd_rules)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s ftpalg %(levelname)s %(message)s")
    try:
        return int(args.func(args))
    except KeyboardInterrupt as e:  # SIGINT, or SIGTERM turned into it; clean-up already ran
        log.warning("interrupted (%s)", e or "SIGINT")
        return 130


if __name__ == "__main__":
    sys.exit(main())
