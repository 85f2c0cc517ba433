"""Command line: ``ftpalg run | check-config | status | doctor | demo | lab up/down | rules``."""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
from types import FrameType
from typing import TYPE_CHECKING

# Only light modules here: main() takes SIGINT/SIGTERM over first thing, before the rest is
# imported (a quarter of a second), so that a stop during `ftpalg run`'s start-up is its own.
from . import __version__, logs
from .linux import stop

if TYPE_CHECKING:
    from .config import Config
    from .lab.lab import Lab

log = logging.getLogger("ftpalg")


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def cmd_run(args: argparse.Namespace) -> int:
    from .linux.serve import run

    cfg: Config = args.cfg
    given = sorted({o for o in cfg.origins.values() if o.startswith("--")})
    log.info("version %s; configuration: %s%s", __version__, cfg.source,
             f"; overridden by {' '.join(given)}" if given else "")
    return run(cfg)  # SIGINT/SIGTERM: recorded since main() began (linux/stop.py)


def cmd_check_config(args: argparse.Namespace) -> int:
    """The effective configuration (file, then options) as TOML; errors never get here (main)."""
    sys.stdout.write(args.cfg.to_toml())
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    import json

    from .linux.status import fetch, render

    name = args.cfg.status.socket
    if not name:
        print("ftpalg status: status.socket is off in the configuration", file=sys.stderr)
        return 1
    try:
        doc = fetch(name)
    except OSError as e:
        print(f"ftpalg status: {e}", file=sys.stderr)
        return 1
    print(json.dumps(doc, indent=2) if args.json else render(doc))
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from .linux.doctor import main

    signal.signal(signal.SIGTERM, _interrupt)  # the scratch namespaces are removed on SIGTERM too
    return main(args.cfg, args.json, not args.no_trials)


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


def _lab_faults(lab: Lab, args: argparse.Namespace) -> int:
    """Loss, duplication and reordering on both links of the lab's gateway (in the client's
    and the servers' namespace, both ways) until Ctrl-C or SIGTERM."""
    from .lab.faults import Faults
    from .linux.rules import RuleError

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

    gw = args.cfg.gateway
    ports, queue, workers, sel = gw.control_ports, gw.queue_num, gw.workers, args.cfg.queue_selected
    text = {
        "nft": lambda: nft_rules(ports, workers=workers),
        "nft-queue": lambda: nft_rules(ports, queue, workers=workers),
        "queue-iptables": lambda: iptables_queue_rules(ports, queue, 4, workers, sel),
        "queue-ip6tables": lambda: iptables_queue_rules(ports, queue, 6, workers, sel),
    }[args.part]()
    sys.stdout.write(text)
    return 0


# Options that override a configuration key: dest -> key. Their values stay text (argparse
# does not check them): config.check does, as it checks the file's values.
OPTION_KEYS = {
    "control_port": "gateway.control_ports",
    "queue_num": "gateway.queue_num",
    "queue_backend": "gateway.queue_backend",
    "queue": "gateway.queue",
    "workers": "gateway.workers",
    "install_rules": "gateway.install_rules",
    "pinhole_timeout": "gateway.pinhole_timeout",
    "min_port": "policy.min_port",
    "max_flows": "policy.max_flows",
    "max_pinholes": "policy.max_pinholes",
    "max_pinholes_per_client": "policy.max_pinholes_per_client",
    "max_held_bytes": "policy.max_held_bytes",
    "log_level": "log.level",
    "audit": "audit.enabled",
    "audit_file": "audit.file",
    "metrics_listen": "metrics.listen",
    "status_socket": "status.socket",
    "nat64_pool": "nat64.pool",
    "nat64_prefix": "nat64.prefix",
}
_SWITCHES = {"install_rules": ("--rules", "--no-rules"), "audit": ("--audit", "--no-audit")}


def option_overrides(args: argparse.Namespace) -> dict[str, tuple[object, str]]:
    """The options given (not defaulted): key -> (value, option name)."""
    from .config import OptionText

    out: dict[str, tuple[object, str]] = {}
    for dest, key in OPTION_KEYS.items():
        v = getattr(args, dest, None)
        if v is None:
            continue
        if isinstance(v, bool):
            out[key] = (v, _SWITCHES[dest][0 if v else 1])
        else:
            out[key] = (OptionText(",".join(v) if isinstance(v, list) else v), "--" + dest.replace("_", "-"))
    if getattr(args, "audit_file", None) is not None and getattr(args, "audit", None) is None:
        out["audit.enabled"] = (True, "--audit-file")  # a file to write to: audit on
    return out


def config_from_args(args: argparse.Namespace) -> Config:
    """The file (``--config``/``check-config FILE``, else the default one if it exists, else
    the defaults), then the options given; raises ConfigError."""
    from . import config
    from .config import ConfigError

    path, file = getattr(args, "config", None), getattr(args, "file", None)
    if path is not None and file is not None and path != file:
        raise ConfigError("check-config", None, f"two files: {file} and --config {path}")
    return config.load_default(path or file).override(option_overrides(args))


def parser() -> argparse.ArgumentParser:
    from . import config, explain, install
    from .config import DEFAULT_QUEUE

    ap = argparse.ArgumentParser(
        prog="ftpalg", description="FTP-aware NAT application-level gateway. `ftpalg run` watches the FTP control "
        "connections through a Linux gateway over NFQUEUE, rewrites the private address a peer announces (PORT, EPRT, "
        "227, 229, ...) to the public one the other side can reach, and opens a one-shot conntrack expectation for "
        "exactly the data connection announced; the kernel keeps doing NAT, conntrack and the data path. Its "
        "configuration file is described in ftpalg.toml(5).")
    ap.add_argument("--version", action="version", version=__version__)
    ap.add_argument("--log-level", metavar="LEVEL", help="debug | info | warning | error (default info)")
    sub = ap.add_subparsers(title="commands", dest="cmd", required=True)
    # Every option below defaults to None ("not given"): only given ones override the file.

    def config_file(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", metavar="FILE",
                       help=f"configuration file (default {config.DEFAULT_PATH} if it exists, else built-in "
                            "defaults); options override it")

    def ports_and_queue(p: argparse.ArgumentParser) -> None:
        p.add_argument("--control-port", action="append", metavar="PORT",
                       help="FTP control port to watch (repeatable, replaces the file's list; default 21)")
        p.add_argument("--queue-num", metavar="N", help=f"NFQUEUE number (default {DEFAULT_QUEUE})")
        p.add_argument("--workers", metavar="N",
                       help="worker processes, one queue each (queue-num, queue-num + 1, ...; default 1); "
                            "one per core the gateway can spare")
        p.add_argument("--queue", metavar="all|selected",
                       help="which control segments leave the kernel (default selected: only those that may carry an "
                            "address; all: every one with payload, SYN, FIN, RST); gateway.queue in ftpalg.toml(5)")

    def run_options(r: argparse.ArgumentParser) -> None:
        ports_and_queue(r)
        r.add_argument("--pinhole-timeout", metavar="SECONDS",
                       help="forget an unused pinhole (expectation) after this long (default 120)")
        lim = r.add_argument_group("policy and limits (see docs/security.md)")
        lim.add_argument("--min-port", metavar="PORT",
                         help="never open a pinhole to a port below this (default 1024; 1 allows any)")
        lim.add_argument("--max-flows", metavar="N",
                         help="control connections tracked at once; at the cap the least recently seen idle "
                              "ones are forgotten (default 16384)")
        lim.add_argument("--max-pinholes", metavar="N",
                         help="live pinholes in total; beyond, announcements open nothing (default 4096)")
        lim.add_argument("--max-pinholes-per-client", metavar="N",
                         help="live pinholes of one FTP client address (default 64)")
        lim.add_argument("--max-held-bytes", metavar="BYTES",
                         help="segments held back for split lines or reordering, in total (default 1 MiB)")
        r.add_argument("--no-rules", dest="install_rules", action="store_const", const=False,
                       help="do not install/remove table inet ftpalg and the queue rule (load deploy/ files "
                            "yourself); gateway.install_rules = false")
        r.add_argument("--rules", dest="install_rules", action="store_const", const=True,
                       help="install the rules even if the file says install_rules = false")
        r.add_argument("--queue-backend", metavar="auto|nft|iptables",
                       help="how to queue control packets (default auto: iptables' NFQUEUE, the tested path; "
                            "nft: nft's queue statement, opt-in, untested with traffic)")
        r.add_argument("--log-level", default=argparse.SUPPRESS, metavar="LEVEL",
                       help="debug | info | warning | error (default info)")
        r.add_argument("--metrics-listen", metavar="HOST:PORT",
                       help='Prometheus endpoint, host:port or [v6]:port; "" = off (default 127.0.0.1:9121)')
        r.add_argument("--status-socket", metavar="SOCKET",
                       help='unix socket of `ftpalg status`: "@name" abstract, or a path; "" = off '
                            "(default @ftpalg-status)")
        r.add_argument("--nat64-pool", metavar="CIDR[,CIDR]",
                       help="IPv4 pool(s) of a NAT64 translator on this gateway (Tayga's dynamic-pool): control "
                            "connections from them are translated for IPv6-only clients (RFC 6384, "
                            'docs/nat64.md); "" = off (default)')
        r.add_argument("--nat64-prefix", metavar="PREFIX",
                       help="the translator's IPv6 prefix (e.g. 2001:db8:64::/96), needed for LPSV only")
        r.add_argument("--audit", action=argparse.BooleanOptionalAction, default=None,
                       help="one structured line per transfer (default off)")
        r.add_argument("--audit-file", metavar="PATH",
                       help='where audit lines go: "" = the log, else a file appended to (implies --audit)')
        r.set_defaults(configured=True)

    r = sub.add_parser("run", help="run the ALG on this gateway")
    config_file(r)
    run_options(r)
    r.set_defaults(func=cmd_run)

    cc = sub.add_parser("check-config", help="check a configuration file; print the effective configuration",
                        description="Print the effective configuration (the file, then the options given) as "
                                    "TOML and exit 0, or print what is wrong and exit 2.")
    cc.add_argument("file", nargs="?", metavar="FILE",
                    help=f"the file to check (default {config.DEFAULT_PATH} if it exists, else built-in defaults)")
    config_file(cc)
    run_options(cc)
    cc.set_defaults(func=cmd_check_config)

    st = sub.add_parser("status", help="the running ftpalg's control connections and pinholes (this netns)")
    config_file(st)
    st.add_argument("--status-socket", metavar="SOCKET", help="the socket `ftpalg run` serves (default @ftpalg-status)")
    st.add_argument("--json", action="store_true", help="the raw JSON document")
    st.set_defaults(func=cmd_status, configured=True)

    doc = sub.add_parser("doctor", help="preflight: can ftpalg run here? (kernel features tried in scratch "
                                        "namespaces, conflicts, forwarded control ports)",
                         description="Check this gateway (its network namespace, read-only) and try the kernel "
                                     "features ftpalg needs in scratch namespaces of its own. One line per check; "
                                     "exit 0 all ok, 1 ftpalg run would fail, 3 warnings only, 2 bad configuration.")
    config_file(doc)
    ports_and_queue(doc)
    doc.add_argument("--queue-backend", metavar="auto|nft|iptables", help="as for ftpalg run")
    doc.add_argument("--json", action="store_true", help="the checks as a JSON document")
    doc.add_argument("--no-trials", action="store_true",
                     help="only the read-only checks of this namespace (no scratch namespaces, nothing loaded)")
    doc.set_defaults(func=cmd_doctor, configured=True)

    d = sub.add_parser("demo", help="lab demo: active-mode FTP through NAT without and with ftpalg")
    d.add_argument("--prefix", default="ftpalg-demo", help="name prefix of the lab's namespaces")
    d.set_defaults(func=cmd_demo)
    explain.add_parser(sub)  # ftpalg explain CAPTURE
    install.add_parser(sub)  # ftpalg install [--root DIR] [--dry-run] [--force]

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
                         "queue rule (as --queue-backend nft: opt-in, untested with traffic); "
                         "queue-iptables / queue-ip6tables: the queue rule for iptables-restore / ip6tables-restore")
    config_file(ru)
    ports_and_queue(ru)
    ru.set_defaults(func=cmd_rules, configured=True)
    return ap


def main(argv: list[str] | None = None) -> int:
    # SIGINT/SIGTERM are recorded, not acted on, from here: `ftpalg run` keeps it so to the
    # end (a stop during its start-up ends it cleanly, exit 0: linux/stop.py); every other
    # command gets the usual handling back once its name is known.
    with stop.stopping():
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    from .config import ConfigError, OptionText, check

    args = parser().parse_args(argv)
    try:
        if args.func is not cmd_run:
            stop.release()  # a stop that came meanwhile acts now (KeyboardInterrupt, or death by SIGTERM)
        if getattr(args, "configured", False):  # run, check-config, rules: file and options, checked
            args.cfg = config_from_args(args)
            level = args.cfg.log.level
        else:
            level = check("log.level", OptionText(args.log_level or "info"), "--log-level")
    except ConfigError as e:
        print(f"ftpalg: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    logs.setup(level)
    try:
        return int(args.func(args))
    except KeyboardInterrupt as e:  # SIGINT, or SIGTERM turned into it (demo, lab faults); clean-up ran
        log.warning("interrupted (%s)", e or "SIGINT")
        return 130


if __name__ == "__main__":
    sys.exit(main())
