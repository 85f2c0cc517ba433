"""``ftpalg demo``: FTP through NAT gateways, without and then with ftpalg, as a matrix of
topology x client x mode x server, every download checked by SHA-256.

Builds the lab (see lab.py: clients behind a MASQUERADE gateway, servers behind a gateway
that forwards only port 21, both at once, IPv6 with NAT66 and without NAT), the NAT64 lab (see
nat64.py: IPv6-only clients, Tayga and MASQUERADE of its pool, IPv4-only servers, one without
EPSV), a Docker host (dockerhost.py: Debian's dockerd in a namespace, vsftpd in a container
that publishes only port 21; left out when docker.io is not installed) and the service lab
(service.py: two Kubernetes nodes with kube-proxy's iptables rules in front of three vsftpd
replicas), all at once; runs every cell with no ALG, starts ``ftpalg run`` in every gateway
(no options; in the NAT64 gateway only the NAT64 option, ``nat64.NAT64_OPTIONS``; in the nodes
their control ports: 21, the NodePort, the pods' port 2121), runs every cell again, prints the
matrix and removes everything it created, also on failure or Ctrl-C. Cells run in parallel:
most failures without ftpalg are timeouts. The NAT64 and Docker tables have a few cells only
(their tests have the full matrices, uploads included). A cell of the service is
``SERVICE_SESSIONS`` sessions, passing only if every data connection reached the replica of
its own control connection; the service's cells run after the others (beside them, on a busy
machine, the others' 6-second cells time out).
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from . import clients, docker, nat64, servers, service
from .dockerhost import CLIENT as DOCKER_CLIENT
from .dockerhost import PUBLISHED, DockerLab
from .lab import (
    CLIENTS,
    CLIENTS6,
    INSIDE_SERVERS6,
    OUTSIDE_CLIENTS,
    OUTSIDE_CLIENTS6,
    PUBLIC_OF,
    SERVERS,
    SERVERS6,
    Lab,
    sha256,
)
from .service_clients import MODES as SERVICE_MODES

FILE = "big.bin"
CELL_TIMEOUT = 6.0  # seconds; a cell that takes longer failed (typically: a dropped SYN)
WORKERS = 24
# What the servers themselves implement (LPRT/LPSV: only the lab's pyftpdlib, RFC 1639).
SERVER_MODES = {"pyftpdlib": set(clients.MODES)}
DEFAULT_SERVER_MODES = {"PORT", "EPRT", "PASV", "EPSV"}
SERVICE_SESSIONS = 6  # per cell of the service: all 6 on their own replica by chance: 1 in 729
SERVICE_TITLE = ("client 192.168.49.100 (and a pod) -> node A (kube-proxy's iptables rules: random choice among "
                 "3 vsftpd replicas on 2 nodes, DNAT, masquerade)")


@dataclass(frozen=True)
class Topology:
    key: str
    title: str
    client_ns: str  # "client" (inside, behind gw) or "server" (the internet)
    source: str
    targets: tuple[tuple[str, str], ...]  # (server kind, address the client connects to)
    family: int
    lab: str = ""  # the lab it is in: "" (lab.py's), NAT64 or DOCKER
    kinds: tuple[clients.ClientKind, ...] = ()  # the client kinds it shows (none: every one of the family)

    def target(self, kind: str) -> str:
        return dict(self.targets)[kind]


def topologies() -> list[Topology]:
    return [
        Topology("client-nat", "client 10.0.0.2 behind gw (MASQUERADE) -> servers 203.0.113.2-5",
                 "client", CLIENTS[0], tuple(SERVERS.items()), 4),
        Topology("server-dnat", "client 203.0.113.100 -> gw2 (DNAT of tcp/21 only) -> servers 10.1.0.2-5",
                 "server", OUTSIDE_CLIENTS[0], tuple(PUBLIC_OF.items()), 4),
        Topology("double-nat", "client 10.0.0.2 -> gw (MASQUERADE) -> gw2 (DNAT) -> servers 10.1.0.2-5",
                 "client", CLIENTS[0], tuple(PUBLIC_OF.items()), 4),
        Topology("ipv6-nat66", "client fd00:1::2 behind gw (NAT66) -> servers 2001:db8:1::2-5",
                 "client", CLIENTS6[0], tuple(SERVERS6.items()), 6),
        Topology("ipv6-stateful", "client 2001:db8:1::100 -> gw2 (no NAT, FORWARD DROP) -> "
                 "servers 2001:db8:3::2-5", "server", OUTSIDE_CLIENTS6[0], tuple(INSIDE_SERVERS6.items()), 6),
        Topology("nat64", f"IPv6-only client {nat64.CLIENTS6[0]} -> gw (tayga {nat64.PREFIX6}, MASQUERADE) -> "
                 f"IPv4-only servers at {nat64.PREFIX6.split('/')[0]}203.0.113.x",
                 "client", nat64.CLIENTS6[0], tuple((k, nat64.SERVERS6[k]) for k in NAT64_SERVERS), 6,
                 lab=NAT64, kinds=NAT64_KINDS),
        # vsftpd only: a few cells (every server: python -m ftpalg.lab.dockerhost)
        Topology("docker-host", "client 192.0.2.100 -> Docker host (dockerd's rules: FORWARD DROP, DNAT of "
                 "-p 192.0.2.2:21:21 only) -> vsftpd in a container", "outside", DOCKER_CLIENT,
                 (("vsftpd", PUBLISHED["vsftpd"]),), 4, lab=DOCKER),
    ]


NAT64, DOCKER = "nat64", "docker"


NAT64_SERVERS = ("vsftpd", servers.NO_EPSV_KIND)
NAT64_KINDS = tuple(clients.ClientKind(n, m) for n, m in (
    ("curl", "EPRT"), ("curl", "EPSV"), ("lftp", "EPSV"), ("ftplib", "EPRT"), ("ftplib", "EPSV"), ("wget", "EPSV"),
    ("tnftp", "EPSV")))
"""The NAT64 table's few cells: the server without EPSV and vsftpd, clients in both modes."""


@dataclass(frozen=True)
class Cell:
    topo: Topology
    client: clients.ClientKind
    server: str


@dataclass(frozen=True)
class Outcome:
    ok: bool
    detail: str


def cells(labs: frozenset[str] = frozenset({"", NAT64, DOCKER})) -> list[Cell]:
    """The cells of the topologies in ``labs``."""
    out = []
    for t in topologies():
        if t.lab not in labs:
            continue
        for k in t.kinds or clients.kinds(family=t.family):
            for server, _ in t.targets:
                # behind NAT64 the ALG translates what the server lacks
                if t.lab == NAT64 or k.mode in SERVER_MODES.get(server, DEFAULT_SERVER_MODES):
                    out.append(Cell(t, k, server))
    return out


def failure_reason(text: str, rc: int | None) -> str:
    """``clients.failure_reason`` with the demo's cell timeout."""
    return clients.failure_reason(text, rc, CELL_TIMEOUT)


def run_cell(labs: dict[str, Lab], cell: Cell, want: str, tag: str) -> Outcome:
    lab = labs[cell.topo.lab]
    out = lab.state / "demo" / f"{tag}-{cell.topo.key}-{cell.client.name}-{cell.client.mode}-{cell.server}"
    out.unlink(missing_ok=True)
    ns = getattr(lab, cell.topo.client_ns)
    argv = cell.client.argv(cell.topo.target(cell.server), FILE, out, source=cell.topo.source)
    try:
        p = lab.ns(ns, ["timeout", "-k", "1", str(CELL_TIMEOUT), *argv], check=False, timeout=CELL_TIMEOUT + 5)
        rc: int | None = None if p.returncode in (124, 137) else p.returncode
        text = p.stderr + p.stdout
    except Exception as e:  # a hung `ip netns exec`: count it as a failure, never crash the demo
        rc, text = None, str(e)
    got = sha256(out) if out.exists() else None
    out.unlink(missing_ok=True)
    if rc == 0 and got == want:
        return Outcome(True, "ok")
    if rc == 0:
        return Outcome(False, "checksum mismatch" if got else "no file")
    if tag == "with":  # keep what the client said, for the report
        out.with_suffix(".log").write_text(" ".join(argv) + "\n" + text)
    return Outcome(False, failure_reason(text, rc))


def matrix(labs: dict[str, Lab], tag: str, todo: list[Cell]) -> dict[Cell, Outcome]:
    """Every cell in its lab (``labs``: by ``Topology.lab``); each lab has its own random
    files, so the checksum is the cell's lab's."""
    want = {k: sha256(lab.files / FILE) for k, lab in labs.items()}
    for lab in labs.values():
        (lab.state / "demo").mkdir(exist_ok=True)
    with ThreadPoolExecutor(WORKERS) as pool:
        return dict(zip(todo, pool.map(lambda c: run_cell(labs, c, want[c.topo.lab], tag), todo), strict=True))


def show(without: dict[Cell, Outcome], with_: dict[Cell, Outcome]) -> None:
    for t in topologies():
        if not any(c.topo == t for c in without):
            continue
        kinds = [k for k, _ in t.targets]
        rows = sorted({(c.client.name, c.client.mode) for c in without if c.topo == t},
                      key=lambda r: (clients.CLIENT_NAMES.index(r[0]), clients.MODES.index(r[1])))
        n = sum(1 for c in with_ if c.topo == t)
        a = sum(o.ok for c, o in without.items() if c.topo == t)
        b = sum(o.ok for c, o in with_.items() if c.topo == t)
        print(f"\n[{t.key}] {t.title}\n  without ftpalg {a}/{n} pass, with ftpalg {b}/{n} pass")
        print("  " + f"{'client':<7}{'mode':<6}" + "".join(f"{k:<15}" for k in kinds))
        for name, mode in rows:
            line = f"  {name:<7}{mode:<6}"
            for k in kinds:
                c = Cell(t, clients.ClientKind(name, mode), k)
                if c not in without:
                    line += f"{'-':<15}"
                    continue
                line += f"{_mark(without[c]) + ' -> ' + _mark(with_[c]):<15}"
            print(line.rstrip())
    reasons: Counter[tuple[str, str]] = Counter()
    for c, o in without.items():
        if not o.ok:
            reasons[(c.topo.key, re.sub(r"\d+\.\d+\.\d+\.\d+:\d+|[0-9a-f:]{6,}:\d+", "ADDR", o.detail)[:70])] += 1
    print("\nwhy cells fail without ftpalg (most common per topology):")
    for t in topologies():
        top = [(r, n) for (k, r), n in reasons.most_common() if k == t.key][:3]
        for r, n in top:
            print(f"  {t.key:<14} {n:>3} x {r}")
    bad = [(c, o) for c, o in with_.items() if not o.ok]
    if bad:
        print("\nFAILED with ftpalg:")
        for c, o in bad:
            print(f"  {c.topo.key} / {c.client.label} / {c.server}: {o.detail}")


def service_cells() -> dict[service.Cell, int]:
    return {service.Cell(e, "ftplib", m): SERVICE_SESSIONS for m in SERVICE_MODES for e in service.ENTRIES}


def service_outcome(lab: service.ServiceLab, results: list[service.SessionResult]) -> Outcome:
    """A service cell passes if every session's data connection reached its own replica."""
    bad = Counter(r.outcome(lab) for r in results if not r.own_replica(lab))
    if not bad and len(results) == SERVICE_SESSIONS:
        return Outcome(True, "ok")
    return Outcome(False, ", ".join(f"{n} x {why}" for why, n in bad.most_common()) or "no sessions")


def show_service(without: dict[service.Cell, Outcome], with_: dict[service.Cell, Outcome]) -> None:
    entries = list(service.ENTRIES)
    a, b = sum(o.ok for o in without.values()), sum(o.ok for o in with_.values())
    print(f"\n[service] {SERVICE_TITLE}\n  without ftpalg {a}/{len(with_)} pass, with ftpalg {b}/{len(with_)} pass "
          f"(a cell: {SERVICE_SESSIONS} sessions, each data connection to its own control connection's replica)")
    print("  " + f"{'client':<7}{'mode':<10}" + "".join(f"{e:<15}" for e in entries))
    for mode in SERVICE_MODES:
        line = f"  {'ftplib':<7}{mode:<10}"
        for e in entries:
            c = service.Cell(e, "ftplib", mode)
            line += f"{_mark(without[c]) + ' -> ' + _mark(with_[c]):<15}"
        print(line.rstrip())
    print("  lb: load-balancer IP publishing port 21 only; lb-classic: the passive range published too (vsftpd "
          "pasv_address); nodeport: the NodePort; clusterip: from a client pod; PASV-PEER: the 227 address ignored")
    why = Counter(o.detail for o in without.values() if not o.ok)
    for detail, n in why.most_common(3):
        print(f"  without ftpalg {n:>3} x {detail[:90]}")
    for c, o in with_.items():
        if not o.ok:
            print(f"  FAILED with ftpalg: {c.label}: {o.detail}")


def _mark(o: Outcome) -> str:
    return "ok" if o.ok else "FAIL"


def _docker_up(lab: DockerLab) -> None:
    lab.up()
    lab.start_docker()


def main(prefix: str = "ftpalg-demo") -> int:
    lab, lab64 = Lab(prefix), nat64.Nat64Lab(f"{prefix}6")
    labs: dict[str, Lab] = {"": lab, NAT64: lab64}
    # (lab, gateway, ftpalg's options): no options but NAT64's, as an admin starts it
    gateways: list[tuple[Lab, str, tuple[str, ...]]] = [(lab, lab.gw, ()), (lab, lab.gw2, ()),
                                                        (lab64, lab64.gw, nat64.NAT64_OPTIONS)]
    missing = docker.missing()
    if not missing:
        dlab = labs[DOCKER] = DockerLab(f"{prefix}-dk", kinds=("vsftpd",))
        gateways.append((dlab, dlab.host, ()))
    todo = cells(frozenset(labs))
    svc = service.ServiceLab(f"{prefix}-svc")
    svc_without: dict[service.Cell, Outcome] = {}
    svc_with: dict[service.Cell, Outcome] = {}
    rcs: list[int] = []
    leftover: list[str] = []
    logs = ""
    t0 = time.monotonic()
    try:
        print("building the lab: inside clients -> gw (MASQUERADE, NAT66) -> internet -> gw2 (DNAT tcp/21, "
              "IPv6 without NAT) -> inside servers; FORWARD policy DROP on both gateways", flush=True)
        print("building the NAT64 lab meanwhile: IPv6-only clients -> gw (tayga, MASQUERADE of its pool; FORWARD "
              "policy DROP) -> IPv4-only servers", flush=True)
        print("building two Kubernetes nodes (kube-proxy's iptables rules) in front of 3 vsftpd replicas meanwhile",
              flush=True)
        ups: list[Callable[[], None]] = [lab.up, lab64.up, svc.up]
        if DOCKER in labs:
            print("building the Docker host meanwhile: dockerd in a namespace, vsftpd in a container publishing "
                  "only -p 192.0.2.2:21:21; an outside client", flush=True)
            ups.append(lambda: _docker_up(dlab))
        else:
            print(f"no Docker host: {', '.join(missing)} not installed (apt-get install {docker.PACKAGE})")
        with ThreadPoolExecutor(len(ups)) as pool:
            for job in [pool.submit(up) for up in ups]:
                job.result()
        print(f"{len(todo)} cells (topology x client x mode x server), without ftpalg ...", flush=True)
        without = matrix(labs, "without", todo)
        print(f"and the service's {len(service_cells())} cells ...", flush=True)
        svc_without = {c: service_outcome(svc, r) for c, r in svc.matrix(service_cells()).items()}
        before = [g.ruleset(gw) for g, gw, _ in gateways]
        svc_before = svc.rulesets()
        print(f"starting `ftpalg run` in gw, gw2{' and the Docker host' if DOCKER in labs else ''}, and "
              f"`ftpalg run {' '.join(nat64.NAT64_OPTIONS)}` in the NAT64 gateway, and in both nodes with "
              "their control ports ...", flush=True)
        procs = [(g, g.start_ftpalg(*opts, gw=gw)) for g, gw, opts in gateways]
        svc_procs = []
        try:
            svc_procs = svc.start_ftpalg_everywhere()
            print("the same cells with ftpalg ...", flush=True)
            with_ = matrix(labs, "with", todo)
            svc_with = {c: service_outcome(svc, r) for c, r in svc.matrix(service_cells()).items()}
        finally:
            rcs = [g.stop_ftpalg(p) for g, p in procs] + svc.stop_ftpalg_everywhere(svc_procs)
        leftover = [gw for (g, gw, _), was in zip(gateways, before, strict=True) if g.ruleset(gw) != was]
        leftover += [gw for gw, r in svc.rulesets().items() if r != svc_before[gw]]
        logs = "".join(g.ftpalg_log(gw) for g, gw, _ in gateways) + "".join(svc.ftpalg_log(gw) for gw in svc.gateways)
    finally:
        for g in labs.values():
            for f in sorted((g.state / "demo").glob("*.log")):
                print(f"--- {f.name}\n{f.read_text()[-1500:]}")
        svc.down()
        for g in reversed(labs.values()):
            g.down()
    show(without, with_)
    show_service(svc_without, svc_with)
    opened = logs.count("pinhole open")
    print(f"\nftpalg: exit codes {rcs}, {opened} pinholes opened, gateways whose ruleset differs after exit: "
          f"{len(leftover)}; {time.monotonic() - t0:.0f} s in all")
    ok = (all(o.ok for o in with_.values()) and len(svc_with) == len(service_cells())
          and all(o.ok for o in svc_with.values()) and rcs == [0] * (len(gateways) + len(svc_procs))
          and not leftover and "Traceback" not in logs)
    print("RESULT:", "every transfer works with ftpalg" if ok else "some transfers FAILED with ftpalg")
    if not ok:
        print(logs[-4000:])
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

