"""``ftpalg explain CAPTURE``: run the core offline over a capture and say what ftpalg would
rewrite and open, what happened to every data connection, and why a transfer failed.

The stages, one module each, in the order ``explain()`` runs them:

- capture.py: read the pcap/pcapng file into numbered frames (IP packets);
- connections.py: the FTP control connections with their lines, the other TCP connections
  (data connections) and the ICMP errors about them;
- nat.py: the NAT mapping a gateway's conntrack would report for each control connection,
  inferred from the addresses and what they announce (where the capture was taken);
- replay.py: the control packets, as a gateway's hook would see them, through the real core
  with an offline conntrack and a pinhole backend that only records;
- diagnose.py: each announcement with the core's decision, its replies and data connections,
  a diagnosis per failed transfer, a verdict per session;
- render.py: text, JSON and an SVG timeline.

Offline only: nothing here is on the packet path.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import sys
from pathlib import Path
from typing import Any

from ..core import policy
from ..core.nat64 import Nat64
from ..core.policy import Limits
from .capture import CaptureError, read_capture
from .connections import control_lines, tcp_conns
from .diagnose import Report, analyse
from .nat import infer_mapping
from .render import json_report, svg_timeline, text_report
from .replay import run_core

__all__ = ["CaptureError", "ExplainError", "Report", "add_parser", "cmd_explain", "explain", "json_report",
           "read_capture", "svg_timeline", "text_report"]


class ExplainError(Exception):
    """A capture that cannot be explained (not a capture, no FTP control connection)."""


def explain(path: Path, public: str | None = None, control_ports: frozenset[int] = frozenset({21}),
            limits: Limits = policy.DEFAULT_LIMITS, pinhole_timeout: float = 120.0,
            nat64: Nat64 | None = None) -> Report:
    """The capture at ``path`` explained, stage by stage (see the module's docstring)."""
    try:
        frames = read_capture(path)
    except CaptureError as e:
        raise ExplainError(str(e)) from None
    if not frames:
        raise ExplainError(f"{path}: the capture holds no packets")
    sessions, data, segs = tcp_conns(frames, control_ports)
    if not sessions:
        ports = ",".join(map(str, sorted(control_ports)))
        raise ExplainError(f"{path}: no FTP control connection found (TCP port {ports}; another port: "
                           "--control-port)")
    for s in sessions:
        control_lines(s, segs)
        infer_mapping(s, public)
    results = run_core(sessions, segs, limits, control_ports, pinhole_timeout, nat64)
    for s in sessions:
        analyse(s, results, data)
    return Report(str(path), len(frames), sessions, data)


# ---- command line -------------------------------------------------------------------------------


def _port(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"port must be a number, not {text!r}") from None
    if not 1 <= n <= 65535:
        raise argparse.ArgumentTypeError(f"port {n} not in 1..65535")
    return n


def add_parser(sub: Any) -> None:
    """Register ``ftpalg explain`` on the CLI's subparsers."""
    e = sub.add_parser("explain", help="explain a capture offline: what ftpalg would rewrite and open, why a "
                                       "transfer failed",
                       description="Run ftpalg's core offline over a pcap/pcapng capture taken on either side of "
                                   "a gateway: per FTP session, each PORT/EPRT/LPRT/227/228/229 with what ftpalg "
                                   "would do, the data connections seen, and why a transfer failed.")
    e.add_argument("capture", type=Path, help="pcap or pcapng file (tcpdump -w; include the data connections: "
                                              "capture 'tcp', not only 'port 21')")
    e.add_argument("--public", metavar="ADDR", help="the gateway's public address, when the capture was taken "
                                                     "behind it (otherwise shown as <public>)")
    e.add_argument("--control-port", type=_port, action="append", metavar="PORT",
                   help="FTP control port (repeatable; default 21)")
    e.add_argument("--min-port", type=_port, default=1024, metavar="PORT",
                   help="as ftpalg run's --min-port (default 1024)")
    e.add_argument("--nat64-pool", metavar="CIDR[,CIDR]",
                   help="as ftpalg run's: clients in these pools are IPv6 clients behind a NAT64 translator "
                        "(the capture taken on its IPv4 side); their sessions are translated (RFC 6384)")
    e.add_argument("--nat64-prefix", metavar="PREFIX", help="as ftpalg run's (the translator's IPv6 prefix)")
    e.add_argument("--json", action="store_true", help="machine-readable output")
    e.add_argument("--svg", type=Path, metavar="FILE", help="also write a timeline picture (SVG)")
    e.set_defaults(func=cmd_explain)


def cmd_explain(args: argparse.Namespace) -> int:
    """0: nothing failed; 1: a session failed; 2: the capture cannot be explained."""
    public = args.public
    if public is not None:
        try:
            public = str(ipaddress.ip_address(public))
        except ValueError:
            print(f"ftpalg explain: --public {public!r} is not an IP address", file=sys.stderr)
            return 2
    try:
        nat64 = Nat64.of([p for p in (args.nat64_pool or "").split(",") if p.strip()], args.nat64_prefix or "")
    except ValueError as e:
        print(f"ftpalg explain: --nat64-pool/--nat64-prefix: {e}", file=sys.stderr)
        return 2
    try:
        report = explain(args.capture, public, frozenset(args.control_port or [21]), Limits(min_port=args.min_port),
                         nat64=nat64)
    except ExplainError as e:
        print(f"ftpalg explain: {e}", file=sys.stderr)
        return 2
    if args.json:
        sys.stdout.write(json.dumps(json_report(report), indent=2) + "\n")
    else:
        sys.stdout.write(text_report(report))
    if args.svg is not None:
        try:
            args.svg.write_text(svg_timeline(report), encoding="utf-8")
        except OSError as e:
            print(f"ftpalg explain: cannot write {args.svg}: {e.strerror or e}", file=sys.stderr)
            return 2
    return 1 if report.failed else 0
