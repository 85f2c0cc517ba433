"""``ftpalg doctor``: a preflight an admin runs on the gateway, in the network namespace
``ftpalg run`` will serve, with the configuration it will use (``--config`` and the same
options).

Two kinds of checks, each one ``Check`` (name, status, detail, fix) that the text and JSON
renderers read:

- the live system, READ-ONLY: what the rule tools list (``ruleset.py``), /proc and /sys, the
  processes of this network namespace. Nothing is loaded, added or bound here;
- the kernel, TRIED FOR REAL in two scratch namespaces of the doctor's own
  (``trials.py``): ftpalg's own rules as ``ftpalg run`` installs them, each iptables match
  and nft feature on its own, a TCP connection to a control port whose segments must reach a
  bound queue (and the right worker's), its conntrack entry over netlink, the carrier helper,
  an expectation created and deleted, a sequence correction, conntrack labels, and nft's
  ``queue`` statement.

Statuses: ``ok``; ``info`` (worth knowing, nothing to do); ``warn`` (``ftpalg run`` works,
but some FTP will not be handled as the admin likely expects); ``fail`` (``ftpalg run``
fails, or does not work). Exit status: 0 all ok, 1 a check failed, 3 warnings only (2 is
every ftpalg command's "bad configuration or usage").
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from .. import __version__
from ..config import DEFAULT_PATH, DEFAULT_QUEUE, Config, toml_value
from .checks import FAIL, INFO, OK, STATUSES, WARN, Check, exit_status
from .rules import CHAIN_QUEUE, FOLLOW_LABEL, HANDOVER_LABELS, LABEL_BASE, NFT_TABLE, SYSTEM_PATH, _bits
from .ruleset import (
    XT_TABLES,
    Rule,
    Ruleset,
    in_spec,
    iter_dnat,
    label_names,
    merge,
    parse_iptables_save,
    parse_nft,
    spec_ports,
    xt_tables,
)
from .trials import run_trials

VERDICT = {0: "ftpalg run will work", 3: "ftpalg run will work, with warnings", 1: "ftpalg run would fail"}


def render_text(checks: list[Check]) -> str:
    width = max((len(c.name) for c in checks), default=0)
    lines = [f"{c.status.upper():<4}  {c.name:<{width}}  {c.detail}" + (f"  => fix: {c.fix}" if c.fix else "")
             for c in checks]
    code = exit_status(checks)
    counts = ", ".join(f"{sum(c.status == s for c in checks)} {s}" for s in STATUSES)
    return "\n".join(lines + [f"{VERDICT[code]} ({counts}; exit {code})", ""])


def render_json(checks: list[Check], cfg: Config, scratch: str) -> str:
    code = exit_status(checks)
    doc = {"version": __version__, "config": cfg.source, "scratch_namespaces": scratch,
           "exit_status": code, "verdict": VERDICT[code],
           "counts": {s: sum(c.status == s for c in checks) for s in STATUSES},
           "checks": [asdict(c) for c in checks]}
    return json.dumps(doc, indent=2) + "\n"


# ---- reading the live system (never writing) ------------------------------------------------
def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _tool_path(name: str) -> str | None:
    import shutil

    return shutil.which(name) or shutil.which(name, path=SYSTEM_PATH)


def _list(argv: list[str]) -> tuple[str, str]:
    """Run a listing tool: (stdout, error text or "")."""
    path = _tool_path(argv[0])
    if path is None:
        return "", f"{argv[0]} not found"
    try:
        p = subprocess.run([path, *argv[1:]], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return "", str(e)
    return p.stdout, "" if p.returncode == 0 else (p.stderr.strip() or f"exit {p.returncode}")


OURS = CHAIN_QUEUE.rsplit("-", 1)[0] + "-"  # FTPALG-*: our chains, left out of the listings


@dataclass
class Live:
    """What the namespace's listing tools and /proc say, read once."""

    backend: str  # "nf_tables", "legacy" or "" (iptables missing)
    version: str
    ruleset: Ruleset
    legacy_tables: list[str]  # legacy xtables tables that exist here


def read_live() -> Live:
    version, err = _list(["iptables", "-V"])
    backend = "nf_tables" if "nf_tables" in version else "legacy" if version else ""
    parts: list[Ruleset] = []
    errors: dict[str, str] = {}
    taken: set[str] = set()  # nft tables read from iptables-nft-save
    for tool, nft_fam in (("iptables", "ip"), ("ip6tables", "ip6")):
        save, e = _list([f"{tool}-nft-save"]) if _tool_path(f"{tool}-nft-save") else _list([f"{tool}-save"])
        if e:
            errors[f"{tool}-save"] = e
        parts.append(parse_iptables_save(save, tool, OURS))
        taken |= {f"{nft_fam} {t}" for t in xt_tables(save) if t in XT_TABLES}
    legacy = _read("/proc/net/ip_tables_names").split() + _read("/proc/net/ip6_tables_names").split()
    if legacy and _tool_path("iptables-legacy-save"):
        for tool in ("iptables", "ip6tables"):
            save, e = _list([f"{tool}-legacy-save"])
            parts.append(parse_iptables_save(save, f"{tool}-legacy", OURS))
    nft, e = _list(["nft", "-a", "list", "ruleset"])
    if e:
        errors["nft"] = e
    parts.append(parse_nft(nft, taken | {f"inet {NFT_TABLE}"}))
    rs = merge(parts)
    rs.errors.update(errors)
    if err:
        rs.errors["iptables"] = err
    return Live(backend, version.strip(), rs, sorted(set(legacy)))


# ---- the processes of this network namespace ---------------------------------------------------
def _own_netns() -> int:
    return os.stat("/proc/self/ns/net").st_ino


def namespace_processes() -> list[tuple[int, str, str]]:
    """(pid, comm, command line) of every process in this network namespace."""
    here = _own_netns()
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if os.stat(d / "ns" / "net").st_ino != here:
                continue
            comm = (d / "comm").read_text().strip()
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        out.append((int(d.name), comm, cmd))
    return out


def socket_owners(inodes: set[int]) -> dict[int, tuple[int, str]]:
    """inode -> (pid, command line) of the processes holding those sockets."""
    out: dict[int, tuple[int, str]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fds = list((d / "fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(fd)
            except OSError:
                continue
            m = re.fullmatch(r"socket:\[(\d+)\]", link)
            if m and int(m.group(1)) in inodes and int(m.group(1)) not in out:
                cmd = " ".join(_read(f"/proc/{d.name}/cmdline").replace("\0", " ").split())  # one line
                out[int(m.group(1))] = (int(d.name), cmd or _read(f"/proc/{d.name}/comm").strip())
    return out


def bound_queues(text: str) -> dict[int, int]:
    """/proc/net/netfilter/nfnetlink_queue -> {queue number: netlink port id of its listener}."""
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].isdigit() and parts[1].isdigit():
            out[int(parts[0])] = int(parts[1])
    return out


def netlink_inodes(text: str, protocol: int = 12) -> dict[int, int]:
    """/proc/net/netlink -> {port id: socket inode} of NETLINK_NETFILTER sockets."""
    out = {}
    for line in text.splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 10 and parts[1] == str(protocol):
            out[int(parts[2])] = int(parts[9])
    return out


# ---- the checks of the live system ----------------------------------------------------------------
CAP_NET_ADMIN, CAP_NET_RAW = 12, 13


def check_privileges() -> Check:
    caps = 0
    for line in _read("/proc/self/status").splitlines():
        if line.startswith("CapEff:"):
            caps = int(line.split()[1], 16)
    if not caps >> CAP_NET_ADMIN & 1:
        return Check("privileges", FAIL, "no CAP_NET_ADMIN: ftpalg run (and the doctor's trials) need it",
                     "run as root, or with CAP_NET_ADMIN (the unit in deploy/ grants it)")
    return Check("privileges", OK, "CAP_NET_ADMIN" + (", CAP_NET_RAW" if caps >> CAP_NET_RAW & 1 else ""))


def check_tools() -> Check:
    need = ["nft", "iptables-restore", "ip6tables-restore", "iptables", "ip6tables"]
    missing = [t for t in need if _tool_path(t) is None]
    if missing:
        return Check("tools", FAIL, f"missing: {', '.join(missing)}", "install nftables and iptables")
    return Check("tools", OK, ", ".join(f"{t} {_tool_path(t)}" for t in ("nft", "iptables")))


def check_backend(live: Live) -> Check:
    if not live.backend:
        return Check("iptables-backend", FAIL, "iptables not found", "install iptables (the nft backend)")
    kind = "nft" if live.backend == "nf_tables" else "legacy"
    detail = f"{live.version}: ftpalg's queue rule goes to iptables-{kind}"
    other = live.legacy_tables if live.backend == "nf_tables" else []
    if other:
        return Check("iptables-backend", INFO, f"{detail}; legacy tables in use here too ({', '.join(other)}): "
                     "both rule sets see every packet, list both (iptables-legacy-save, iptables-save)")
    return Check("iptables-backend", OK, detail)


@dataclass(frozen=True)
class Manager:
    name: str
    chains: tuple[str, ...]  # chain name prefixes it creates
    tables: tuple[str, ...]  # nft tables it creates
    processes: tuple[str, ...]  # program names
    units: tuple[str, ...]
    note: str


MANAGERS = (
    Manager("firewalld", ("INPUT_direct", "FORWARD_direct", "FWDI_", "IN_public"), ("inet firewalld",
            "ip firewalld", "ip6 firewalld"), ("firewalld",), ("firewalld.service",),
            "it accepts related connections (ftpalg's data connections) in every zone; do not add its ftp "
            "service helper to ftpalg's control ports"),
    Manager("docker", ("DOCKER", "DOCKER-USER", "DOCKER-ISOLATION-STAGE-1"), (), ("dockerd",),
            ("docker.service",),
            "publish only the container's control port; ftpalg opens the data connections"),
    Manager("kube-proxy", ("KUBE-SERVICES", "KUBE-FORWARD", "KUBE-PROXY-CANARY"), ("ip kube-proxy",
            "ip6 kube-proxy"), ("kube-proxy",), ("kube-proxy.service",),
            "run ftpalg on every node, in the host's network namespace"),
    Manager("ufw", ("ufw-", "ufw6-"), (), (), ("ufw.service",),
            "it accepts related connections (ftpalg's data connections) by default"),
)


def check_managers(live: Live, procs: list[tuple[int, str, str]]) -> list[Check]:
    chains = live.ruleset.chain_names()
    tables = live.ruleset.tables() | {r.table for r in live.ruleset.rules if r.nft}
    out = []
    for m in MANAGERS:
        seen = []
        own = sorted({c for c in chains if any(c == p or (p.endswith(("-", "_")) and c.startswith(p))
                                                      for p in m.chains)})
        if own:
            seen.append(f"chains {', '.join(own[:4])}{' ...' if len(own) > 4 else ''}")
        seen += [f"table {t}" for t in m.tables if t in tables]
        running = sorted({f"{comm} (pid {pid})" for pid, comm, cmd in procs
                          if comm in m.processes or cmd.split(" ", 1)[0].endswith(tuple(f"/{p}" for p in m.processes))})
        seen += [f"running here: {', '.join(running)}"] if running else []
        if m.name == "ufw" and re.search(r"^ENABLED=yes", _read("/etc/ufw/ufw.conf"), re.M):
            seen.append("enabled in /etc/ufw/ufw.conf")
        units = [u for u in m.units if any(Path(d, u).exists() for d in
                                           ("/etc/systemd/system", "/lib/systemd/system", "/usr/lib/systemd/system"))]
        if seen:
            out.append(Check(f"manager-{m.name}", INFO, f"{'; '.join(seen)}: {m.note}"))
        elif units:
            out.append(Check(f"manager-{m.name}", OK, f"not active in this namespace (unit {units[0]} installed)"))
        else:
            out.append(Check(f"manager-{m.name}", OK, "not present"))
    return out


def check_related(live: Live) -> Check:
    """A gateway whose forward path drops by default must accept related connections: the
    data connections ftpalg opens are RELATED to their control connection."""
    rs = live.ruleset
    drops = [f"{t} {c}" for (tool, t, c), (hook, policy) in rs.chains.items()
             if policy == "drop" and (c == "FORWARD" or hook == "forward")]
    related = [r for r in rs.rules if re.search(r"related", r.text, re.I)
               and re.search(r"\b(?:accept|-j ACCEPT)\b", r.text, re.I)]
    if not drops:
        return Check("related-accept", OK, "the forward path accepts by default")
    if related:
        return Check("related-accept", OK, f"forward policy drop ({drops[0]}), related connections accepted "
                                           f"({related[0].shown()})")
    return Check("related-accept", WARN, f"forward policy drop ({', '.join(drops)}) and no rule accepts related "
                                         "connections: data connections would be dropped",
                 "add e.g. iptables -I FORWARD -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT "
                 "(nft: ct state established,related accept)")


def _ports_text(ports: Iterable[int]) -> str:
    return ",".join(str(p) for p in sorted(ports))


def check_ftp_helper(live: Live, cfg: Config) -> Check:
    """The kernel's FTP helper must not be attached to ftpalg's control connections: a
    connection has one helper, and both would rewrite the same lines."""
    ports = cfg.control_ports
    rs = live.ruleset
    found: list[tuple[Rule, str]] = []
    for r in rs.rules:
        if r.nft:
            m = re.search(r'\bct helper set "?([\w.-]+)"?', r.text)
            if not m or not rs.helpers.get((r.table, m.group(1)), "").startswith("ftp"):
                continue
        elif r.jump() != "CT" or not (r.option("--helper") or "").startswith("ftp"):
            continue
        specs = rs.public_ports(r)
        hit = sorted(p for p in ports if not specs or any(in_spec(p, s) for s in specs))
        if hit:
            found.append((r, f"port{'s' if len(hit) > 1 else ''} {_ports_text(hit)}"))
    auto = _read("/proc/sys/net/netfilter/nf_conntrack_helper").strip() == "1"
    if auto and Path("/sys/module/nf_conntrack_ftp").exists():
        mod_ports = _read("/sys/module/nf_conntrack_ftp/parameters/ports").strip() or "21"
        hit = sorted(p for p in ports if str(p) in mod_ports.split(","))
        if hit:
            return Check("conflict-ftp-helper", FAIL,
                         f"nf_conntrack_helper=1 attaches the kernel's ftp helper to port {_ports_text(hit)} by itself",
                         "sysctl -w net.netfilter.nf_conntrack_helper=0 (and in /etc/sysctl.d/)")
    if not found:
        return Check("conflict-ftp-helper", OK, f"the kernel's ftp helper is not attached to control port "
                                                f"{_ports_text(ports)}")
    r, where = found[0]
    more = f" (and {len(found) - 1} more rule{'s' if len(found) > 2 else ''})" if len(found) > 1 else ""
    fix = f"{'; '.join(x.delete() for x, _ in found)} (and take it out of the saved firewall configuration)"
    if "firewalld" in r.table:
        fix = "remove the ftp service's helper from the zone (firewall-cmd --remove-service=ftp, keep the port: " \
              f"--add-port=21/tcp) or {fix}"
    return Check("conflict-ftp-helper", FAIL,
                 f"the kernel's ftp helper is attached to control {where} by `{r.shown()}`{more}: ftpalg's helper "
                 "and rewrites need the connection to themselves", fix)


def check_queue(cfg: Config) -> Check:
    gw = cfg.gateway
    wanted = range(gw.queue_num, gw.queue_num + gw.workers)
    bound = bound_queues(_read("/proc/net/netfilter/nfnetlink_queue"))
    taken = {q: port for q, port in bound.items() if q in wanted}
    span = f"{gw.queue_num}" if gw.workers == 1 else f"{gw.queue_num}-{wanted[-1]}"
    if not taken:
        return Check("conflict-queue", OK, f"queue {span} free")
    inodes = netlink_inodes(_read("/proc/net/netlink"))
    owners = socket_owners({inodes[p] for p in taken.values() if p in inodes})
    who = []
    for q, port in sorted(taken.items()):
        pid, cmd = owners.get(inodes.get(port, -1), (0, "an unknown process"))
        who.append(f"queue {q} is bound by {cmd[:60]}" + (f" (pid {pid})" if pid else f" (netlink port {port})"))
    free = next((n for n in range(DEFAULT_QUEUE, 65536 - gw.workers)
                 if not any(q in bound for q in range(n, n + gw.workers))), 0)
    if all(_is_ftpalg_run(owners.get(inodes.get(port, -1), (0, ""))[1]) for port in taken.values()):
        return Check("conflict-queue", FAIL, "; ".join(who) + ": an ftpalg already serves here",
                     "stop it first (see instance)")
    return Check("conflict-queue", FAIL, "; ".join(who) + ": ftpalg could not bind it",
                 f"stop that program, or give ftpalg a free queue: queue_num = {free} in [gateway] "
                 f"(--queue-num {free})")


def _is_ftpalg_run(cmd: str) -> bool:
    words = cmd.split()
    return "run" in words and any(w == "ftpalg" or w.endswith("/ftpalg") for w in words)


def check_instance() -> Check:
    """``ftpalg run`` holds @ftpalg-run while it serves this namespace."""
    if "@ftpalg-run" in _read("/proc/net/unix").split():
        return Check("instance", FAIL, "an ftpalg run already serves this network namespace (@ftpalg-run is "
                                       "bound): a second one refuses to start",
                     "stop it first (systemctl stop ftpalg), or run the doctor before starting it")
    if _nft_table_present():
        return Check("instance", INFO, f"table inet {NFT_TABLE} is here without a running ftpalg (kept for a "
                                       "restart, or left by a crash): ftpalg run replaces it")
    return Check("instance", OK, "no ftpalg run here yet")


def _nft_table_present() -> bool:
    out, err = _list(["nft", "list", "tables"])
    return not err and f"table inet {NFT_TABLE}" in out


def used_labels(cfg: Config) -> dict[int, str]:
    """The conntrack labels ftpalg will use with this configuration, and what for."""
    out = {}
    if cfg.queue_selected:
        out[FOLLOW_LABEL] = "a followed control connection (queue = selected)"
        for b in HANDOVER_LABELS:
            out[b] = "a passive command awaiting its reply, handed over across a restart"
    if cfg.gateway.workers > 1:
        for j in range(_bits(cfg.gateway.workers)):
            out[LABEL_BASE + j] = "the worker of a control connection"
    return out


def check_labels(live: Live, cfg: Config) -> Check:
    mine = used_labels(cfg)
    if not mine:
        return Check("conflict-labels", OK, "this configuration uses no conntrack label")
    names = label_names(_read(p) for p in ("/etc/xtables/connlabel.conf", "/etc/connlabel.conf"))
    clashes = []
    for r in live.ruleset.rules:
        for lab in r.labels():
            bit = int(lab) if lab.isdigit() else names.get(lab)
            if bit in mine:
                clashes.append((bit, r))
    ours = _ports_text(mine)
    if not clashes:
        return Check("conflict-labels", OK, f"labels {ours} unused by other rules")
    bit, r = clashes[0]
    return Check("conflict-labels", FAIL, f"conntrack label {bit} ({mine[bit]}) is also used by `{r.shown()}`"
                                          f"{f' and {len(clashes) - 1} more' if len(clashes) > 1 else ''}",
                 "move that rule to labels ftpalg does not use (ftpalg: 120-125 with workers, 127 with "
                 "queue = selected)")


def check_forwarding(live: Live, cfg: Config) -> Check:
    """A public port forwarded (DNAT, REDIRECT) to a control port must be a control port
    itself: the helper and the queue rule match the port the client connected to."""
    ports = cfg.control_ports
    missing: dict[int, Rule] = {}
    for r, to in iter_dnat(live.ruleset):
        if to not in ports:
            continue
        for spec in live.ruleset.public_ports(r):
            for p in spec_ports(spec):
                if p not in ports:
                    missing.setdefault(p, r)
    if not missing:
        return Check("forwarded-ports", OK, f"no port forwarded to control port {_ports_text(ports)} "
                                            "besides the configured ones")
    new = sorted(ports | set(missing))
    where = f"{DEFAULT_PATH} (a new file)" if cfg.source.startswith("built-in") else cfg.source
    p, r = next(iter(sorted(missing.items())))
    return Check("forwarded-ports", WARN,
                 f"port {_ports_text(missing)} is forwarded to control port {r.dnat_port()} (`{r.shown()}`) but is "
                 "not a control port: FTP through it is not handled",
                 f"add to [gateway] in {where}: control_ports = {toml_value(tuple(new))} "
                 f"(or {' '.join(f'--control-port {q}' for q in new)})")


# ---- the doctor ---------------------------------------------------------------------------------
def live_checks(cfg: Config) -> list[Check]:
    live = read_live()
    procs = namespace_processes()
    checks = [check_tools(), check_backend(live)]
    errors = live.ruleset.errors
    if errors:
        said = "; ".join(f"{k}: {v.splitlines()[0]}" for k, v in sorted(errors.items()))
        checks.append(Check("ruleset", FAIL, f"could not list the ruleset ({said})",
                            "run the doctor as root in the gateway's network namespace"))
    checks += check_managers(live, procs)
    checks += [check_instance(), check_queue(cfg)]
    for name, check in (("related-accept", check_related), ("conflict-ftp-helper", lambda x: check_ftp_helper(x, cfg)),
                        ("conflict-labels", lambda x: check_labels(x, cfg)),
                        ("forwarded-ports", lambda x: check_forwarding(x, cfg))):
        checks.append(Check(name, WARN, "not checked: the ruleset could not be listed") if errors else check(live))
    return checks


def run_doctor(cfg: Config, trials: bool = True, prefix: str = "fdoc") -> list[Check]:
    """Every check, in order: privileges, the live system, then the trials."""
    checks = [check_privileges()]
    checks += live_checks(cfg)
    if trials and checks[0].status != FAIL:
        checks += run_trials(cfg, prefix)
    elif trials:
        checks.append(Check("trials", FAIL, "not run: they need CAP_NET_ADMIN", checks[0].fix))
    return checks


def main(cfg: Config, as_json: bool = False, trials: bool = True, prefix: str = "fdoc") -> int:
    import sys

    checks = run_doctor(cfg, trials, prefix)
    scratch = f"{prefix}{os.getpid()}-c, {prefix}{os.getpid()}-g (removed)" if trials else ""
    sys.stdout.write(render_json(checks, cfg, scratch) if as_json else render_text(checks))
    return exit_status(checks)

