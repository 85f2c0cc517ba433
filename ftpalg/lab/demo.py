"""``ftpalg demo``: FTP through NAT gateways, without and then with ftpalg, as a matrix of
topology x client x mode x server, every download checked by SHA-256.

Builds the lab (see lab.py: clients behind a MASQUERADE gateway, servers behind a gateway
that forwards only port 21, both at once, IPv6 with NAT66 and without NAT) and a Docker host
(dockerhost.py: Debian's dockerd in a namespace, vsftpd in a container that publishes only
port 21; skipped when docker.io is not installed), runs every cell with no
ALG, starts ``ftpalg run`` (no options) in both gateways and in the Docker host, runs every
cell again, prints the matrix and removes everything it created, also on failure or Ctrl-C.
Cells run in parallel: most failures without ftpalg are timeouts.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from . import clients, docker
from .dockerhost import CLIENT as DOCKER_CLIENT
from .dockerhost import PUBLISHED, DockerLab
from .lab import (
    CLIENTS,
    CLIENTS6,
    INSIDE_SERVERS,
    INSIDE_SERVERS6,
    OUTSIDE_CLIENTS,
    OUTSIDE_CLIENTS6,
    PUBLIC_OF,
    SERVERS,
    SERVERS6,
    Lab,
    sha256,
)

FILE = "big.bin"
CELL_TIMEOUT = 6.0  # seconds; a cell that takes longer failed (typically: a dropped SYN)
WORKERS = 24
# What the servers themselves implement (LPRT/LPSV: only the lab's pyftpdlib, RFC 1639).
SERVER_MODES = {"pyftpdlib": set(clients.MODES)}
DEFAULT_SERVER_MODES = {"PORT", "EPRT", "PASV", "EPSV"}
_REPLY = re.compile(r"\b[45]\d\d[ -][^\r\n)]*")


@dataclass(frozen=True)
class Topology:
    key: str
    title: str
    client_ns: str  # "client" (inside, behind gw) or "server" (the internet)
    source: str
    targets: tuple[tuple[str, str], ...]  # (server kind, address the client connects to)
    family: int
    docker: bool = False  # in the Docker host lab (dockerhost.py), not the lab of lab.py

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
        # vsftpd only: a few cells (every server: python -m ftpalg.lab.dockerhost)
        Topology("docker-host", "client 192.0.2.100 -> Docker host (dockerd's rules: FORWARD DROP, DNAT of "
                 "-p 192.0.2.2:21:21 only) -> vsftpd in a container", "outside", DOCKER_CLIENT,
                 (("vsftpd", PUBLISHED["vsftpd"]),), 4, docker=True),
    ]


@dataclass(frozen=True)
class Cell:
    topo: Topology
    client: clients.ClientKind
    server: str


@dataclass(frozen=True)
class Outcome:
    ok: bool
    detail: str


def cells(with_docker: bool = True) -> list[Cell]:
    out = []
    for t in topologies():
        if t.docker and not with_docker:
            continue
        for k in clients.kinds(family=t.family):
            for server in INSIDE_SERVERS:
                if server in dict(t.targets) and k.mode in SERVER_MODES.get(server, DEFAULT_SERVER_MODES):
                    out.append(Cell(t, k, server))
    return out


def failure_reason(text: str, rc: int | None) -> str:
    """The first FTP error reply a client printed, else its last line."""
    replies = _REPLY.findall(text)
    if replies:
        return replies[0].strip()
    if rc is None:
        return f"no answer within {CELL_TIMEOUT:.0f} s"
    # the client's own last words, not the commands it echoed (curl "> ", tnftp "---> ")
    lines = [line for line in text.strip().splitlines()
             if line.strip() and not line.startswith((">", "--->", "<", "*"))]
    return lines[-1].strip() if lines else f"exit {rc}"


@dataclass
class Labs:
    """The lab of lab.py and the Docker host lab (None: docker.io is not installed)."""

    lab: Lab
    docker: DockerLab | None

    def of(self, topo: Topology) -> Lab:
        return self.docker if topo.docker and self.docker is not None else self.lab

    def all(self) -> list[Lab]:
        return [self.lab] + ([self.docker] if self.docker is not None else [])


def run_cell(lab: Lab, cell: Cell, tag: str) -> Outcome:
    want = sha256(lab.files / FILE)
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


def matrix(labs: Labs, tag: str, todo: list[Cell]) -> dict[Cell, Outcome]:
    for lab in labs.all():
        (lab.state / "demo").mkdir(exist_ok=True)
    with ThreadPoolExecutor(WORKERS) as pool:
        return dict(zip(todo, pool.map(lambda c: run_cell(labs.of(c.topo), c, tag), todo), strict=True))


def show(without: dict[Cell, Outcome], with_: dict[Cell, Outcome]) -> None:
    for t in topologies():
        if not any(c.topo == t for c in without):
            continue
        kinds = [k for k in INSIDE_SERVERS if k in dict(t.targets)]
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


def _mark(o: Outcome) -> str:
    return "ok" if o.ok else "FAIL"


def _docker_up(lab: DockerLab) -> None:
    lab.up()
    lab.start_docker()


def main(prefix: str = "ftpalg-demo") -> int:
    lab = Lab(prefix)
    missing = docker.missing()
    labs = Labs(lab, None if missing else DockerLab(f"{prefix}-dk", kinds=("vsftpd",)))
    todo = cells(with_docker=labs.docker is not None)
    rcs: list[int] = []
    leftover: list[str] = []
    logs = ""
    t0 = time.monotonic()
    try:
        print("building the lab: inside clients -> gw (MASQUERADE, NAT66) -> internet -> gw2 (DNAT tcp/21, "
              "IPv6 without NAT) -> inside servers; FORWARD policy DROP on both gateways", flush=True)
        if labs.docker is None:
            print(f"no Docker host: {', '.join(missing)} not installed (apt-get install {docker.PACKAGE})")
            lab.up()
        else:
            print("building the Docker host meanwhile: dockerd in a namespace, vsftpd in a container publishing "
                  "only -p 192.0.2.2:21:21; an outside client", flush=True)
            with ThreadPoolExecutor(2) as pool:
                jobs = [pool.submit(lab.up), pool.submit(_docker_up, labs.docker)]
                for job in jobs:
                    job.result()
        # (lab, gateway namespace) of every place ftpalg runs
        gateways = [(lab, lab.gw), (lab, lab.gw2)] + ([(labs.docker, labs.docker.host)] if labs.docker else [])
        print(f"{len(todo)} cells (topology x client x mode x server), without ftpalg ...", flush=True)
        without = matrix(labs, "without", todo)
        before = [g.ruleset(gw) for g, gw in gateways]
        print(f"starting `ftpalg run` in gw, gw2{' and the Docker host' if labs.docker else ''} ...", flush=True)
        procs = [g.start_ftpalg(gw=gw) for g, gw in gateways]  # no options: as an admin starts it
        try:
            print("the same cells with ftpalg ...", flush=True)
            with_ = matrix(labs, "with", todo)
        finally:
            rcs = [g.stop_ftpalg(p) for (g, _), p in zip(gateways, procs, strict=True)]
        leftover = [gw for (g, gw), b in zip(gateways, before, strict=True) if g.ruleset(gw) != b]
        logs = "".join(g.ftpalg_log(gw) for g, gw in gateways)
    finally:
        for g in labs.all():
            for f in sorted((g.state / "demo").glob("*.log")):
                print(f"--- {f.name}\n{f.read_text()[-1500:]}")
        for g in labs.all():
            g.down()
    show(without, with_)
    opened = logs.count("pinhole open")
    print(f"\nftpalg: exit codes {rcs}, {opened} pinholes opened, gateways whose ruleset differs after exit: "
          f"{len(leftover)}; {time.monotonic() - t0:.0f} s in all")
    ok = all(o.ok for o in with_.values()) and set(rcs) == {0} and not leftover and "Traceback" not in logs
    print("RESULT:", "every transfer works with ftpalg" if ok else "some transfers FAILED with ftpalg")
    if not ok:
        print(logs[-4000:])
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

