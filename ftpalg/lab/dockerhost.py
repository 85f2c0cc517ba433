"""A Docker host: FTP servers in containers that publish only their control port::

  <p>-dc   outside client   eth0  192.0.2.100/24
    │ eth0 ── eth0
  <p>-dh   Docker host      eth0  192.0.2.1/24 and the published addresses 192.0.2.2 .3 .4
           dockerd              docker0 172.17.0.1/16 (Docker's default bridge)
           (ftpalg runs         containers  vsftpd    -p 192.0.2.2:21:21 -p 127.0.0.1:21:21
            here)                           proftpd   -p 192.0.2.3:21:21
                                            pure-ftpd -p 192.0.2.4:21:21

Docker's engine (``docker.Dockerd``) runs in the Docker host's namespace with its own
ruleset (FORWARD policy DROP, DOCKER-USER, DOCKER-ISOLATION-STAGE-1/2, ``-o docker0 RELATED,
ESTABLISHED ACCEPT``, a DNAT per published port in DOCKER, MASQUERADE of the bridge) and a
``docker-proxy`` per published port, which serves clients on the Docker host itself. Each
server publishes port 21 only, on an address of its own (``-p 21:21`` is the same for a
single container); no passive port range, no public address in the server's configuration:
what the images' documentation asks for is exactly what is left out. The servers' 227 names
their container's address (172.17.0.x). vsftpd is also published on 127.0.0.1:21, served by
docker-proxy alone (Docker's DNAT skips 127.0.0.0/8).

``DockerLab`` is a ``lab.Lab`` (``start_ftpalg``, ``ruleset``, ``ns``, files, ...) whose
gateway is the Docker host; ``up()`` builds the namespaces, the lab's files and the image's
root file system, ``start_docker()`` starts dockerd, imports the image and starts the
containers (in a fixed order: the same addresses each time), ``stop_docker()`` stops it and
removes them. ``down()`` removes everything, also after a failure. Not for production paths.
"""

from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from . import clients, docker
from .lab import STATE_ROOT, Lab, sha256
from .netns import add_namespaces

HOST = "192.0.2.1"
CLIENT = "192.0.2.100"
PUBLISHED = {"vsftpd": "192.0.2.2", "proftpd": "192.0.2.3", "pure-ftpd": "192.0.2.4"}
"""Server kind -> the Docker host's address whose port 21 the container publishes."""
LOOPBACK_PUBLISHED = {"vsftpd": "127.0.0.1"}
"""Also published there: reachable through docker-proxy only, from the Docker host itself."""
BRIDGE = "172.17.0.1/16"
IMAGE = "ftpalg-lab/ftp"
DOCKER_ROOT = Path("/var/tmp/ftpalg-docker")
"""dockerd's files (images, containers) of each lab: ``DOCKER_ROOT/<prefix>``, on disk."""
SUFFIXES = ("dc", "dh")
# Each client kind in each mode it has over IPv4, with the servers the lab runs (no LPRT/LPSV);
# plus curl's default for PASV, which connects to the control connection's peer, not to the
# 227 address (the mode "PASV-peer").
PASV_PEER = "PASV-peer"


def client_argv(kind: clients.ClientKind, mode: str, host: str, remote: str, out: Path,
                source: str | None = None) -> list[str]:
    """``kind.argv``; for ``PASV_PEER`` (curl only) without ``--no-ftp-skip-pasv-ip``."""
    argv = kind.argv(host, remote, out, source=source)
    if mode == PASV_PEER:
        if kind.name != "curl" or kind.mode != "PASV":
            raise ValueError(f"{PASV_PEER} is curl's PASV")
        argv = [a for a in argv if a != "--no-ftp-skip-pasv-ip"]
    return argv


def modes() -> list[tuple[clients.ClientKind, str]]:
    """(client kind, mode) of every IPv4 mode of every client that the containers' servers
    speak: PORT, EPRT, PASV, EPSV, and curl's PASV to the control connection's peer."""
    out = []
    for k in clients.kinds(family=4):
        if k.mode in ("PORT", "EPRT", "PASV", "EPSV"):
            out.append((k, k.mode))
            if k.name == "curl" and k.mode == "PASV":
                out.append((k, PASV_PEER))
    return out


@dataclass
class DockerLab(Lab):
    """The Docker host lab (see the module's docstring); ``kinds``: the servers it runs."""

    prefix: str = "ftpalg-docker"
    kinds: tuple[str, ...] = docker.FTP_KINDS
    dockerd: docker.Dockerd | None = field(default=None, repr=False)

    @property
    def host(self) -> str:
        """The Docker host: dockerd, its containers' bridge, and ftpalg."""
        return f"{self.prefix}-dh"

    @property
    def outside(self) -> str:
        """The outside client."""
        return f"{self.prefix}-dc"

    @property
    def gw(self) -> str:  # Lab's methods act on the gateway: the Docker host
        return self.host

    @property
    def gateways(self) -> tuple[str, str]:
        return (self.host, self.host)

    @property
    def namespaces(self) -> tuple[str, ...]:
        return tuple(f"{self.prefix}-{s}" for s in SUFFIXES)

    @property
    def state(self) -> Path:
        return STATE_ROOT / self.prefix

    @property
    def rootfs(self) -> Path:
        return self.state / "rootfs"

    @property
    def docker_root(self) -> Path:
        return DOCKER_ROOT / self.prefix

    def up(self, servers: bool = False) -> None:
        """Namespaces, files and the image's root file system; dockerd: ``start_docker``."""
        self.down()
        try:
            self.state.mkdir(parents=True, exist_ok=True)
            addrs = [f"{HOST}/24", *[f"{a}/32" for a in PUBLISHED.values()]]
            add_namespaces(self.namespaces, [(self.outside, "eth0", self.host, "eth0")],
                           {self.outside: {"eth0": [f"{CLIENT}/24"]}, self.host: {"eth0": addrs}})
            for ns in self.namespaces:
                self.ns(ns, ["sh", "-c", "sysctl -qw net.ipv4.conf.all.rp_filter=0 net.ipv4.tcp_tw_reuse=1; "
                             "h=/proc/sys/net/netfilter/nf_conntrack_helper; [ ! -e $h ] || echo 0 > $h"])
            self._files()
            docker.ftp_rootfs(self.rootfs)
            if servers:
                self.start_docker()
        except BaseException:
            self.down()
            raise

    def start_docker(self) -> None:
        """Start dockerd in the Docker host, import the image, start the containers."""
        if self.dockerd is None:
            self.dockerd = docker.Dockerd(self.host, self.docker_root, bip=BRIDGE)
        self.dockerd.start()
        if IMAGE not in self.dockerd.docker("images", "--format", "{{.Repository}}").stdout.split():
            self.dockerd.import_image(self.rootfs, IMAGE)
        for kind in self.kinds:
            spec = docker.server_container(kind, self.files, self.state / "servers" / kind)
            publish = [f"{a}:21:21" for a in (PUBLISHED[kind], LOOPBACK_PUBLISHED.get(kind)) if a]
            # unconfined: where AppArmor is on, Docker's profile needs apparmor_parser (dev.sh installs no apparmor)
            extra = [*spec.extra, "--security-opt", "apparmor=unconfined"]
            self.dockerd.run_container(kind, IMAGE, list(spec.argv), publish, spec.volumes, spec.init, extra)
        self.wait_ports({self.host: [(a, 21) for k, a in PUBLISHED.items() if k in self.kinds]})

    def stop_docker(self, remove: bool = True) -> None:
        """Stop dockerd (``remove``: remove the containers first, so that the next start
        makes them again in order, with the same addresses and rules)."""
        if self.dockerd is None:
            return
        if remove and self.dockerd.proc is not None:
            self.dockerd.docker("rm", "-f", *self.kinds, check=False)
        self.dockerd.stop()

    def down(self) -> None:
        """Stop dockerd (one left by a killed run too: its containers are found by their
        cgroups), remove its files, the namespaces and the lab's files."""
        d, self.dockerd = self.dockerd, None
        try:
            (d or docker.Dockerd(self.host, self.docker_root, bip=BRIDGE)).close()
        finally:
            super().down()
            with contextlib.suppress(OSError):
                DOCKER_ROOT.rmdir()

    def target(self, kind: str) -> str:
        return PUBLISHED[kind]


# ---- sessions ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Cell:
    """One download: ``client`` in ``mode`` from server ``kind``, by the outside client
    (``local`` None) or by a client on the Docker host itself connecting to ``local`` (a
    published address: Docker's DNAT in OUTPUT; 127.0.0.1: docker-proxy)."""

    client: clients.ClientKind
    mode: str
    kind: str
    local: str | None = None

    @property
    def label(self) -> str:
        where = f" from the Docker host to {self.local}" if self.local else ""
        return f"{self.client.name} {self.mode} {self.kind}{where}"


@dataclass(frozen=True)
class Outcome:
    ok: bool
    detail: str


def cells(kinds: tuple[str, ...] = docker.FTP_KINDS, names: tuple[str, ...] | None = None,
          local: str | None = None) -> list[Cell]:
    """Every (client, mode) of ``modes()`` (clients ``names`` only, if given) with each
    server of ``kinds``."""
    return [Cell(k, m, s, local) for k, m in modes() if names is None or k.name in names for s in kinds]


def run_cell(lab: DockerLab, cell: Cell, remote: str = "small.txt", timeout: float = 15.0) -> Outcome:
    """Download ``remote`` in ``cell``; ok if the file arrived whole (SHA-256)."""
    out = lab.state / "downloads" / f"{cell.label.replace(' ', '-')}-{remote}"
    out.parent.mkdir(exist_ok=True)
    out.unlink(missing_ok=True)
    ns, source = (lab.host, None) if cell.local else (lab.outside, CLIENT)
    argv = client_argv(cell.client, cell.mode, cell.local or PUBLISHED[cell.kind], remote, out, source)
    p = lab.ns(ns, ["timeout", "-k", "1", str(timeout), *argv], check=False, timeout=timeout + 10)
    want = sha256(lab.files / remote)
    got = sha256(out) if out.exists() else None
    out.unlink(missing_ok=True)
    if p.returncode == 0 and got == want:
        return Outcome(True, "ok")
    lines = [line for line in (p.stderr + p.stdout).strip().splitlines() if line.strip()]
    return Outcome(False, f"exit {p.returncode}: {lines[-1].strip() if lines else ''}"[:160])


def run_cells(lab: DockerLab, todo: list[Cell], remote: str = "small.txt", timeout: float = 15.0,
              workers: int = 16) -> dict[Cell, Outcome]:
    """``run_cell`` for each of ``todo``, at once."""
    with ThreadPoolExecutor(workers) as pool:
        return dict(zip(todo, pool.map(lambda c: run_cell(lab, c, remote, timeout), todo), strict=True))


def main(prefix: str = "ftpalg-docker") -> int:
    """``python -m ftpalg.lab.dockerhost``: every client in every mode with every server, by
    the outside client and by clients on the Docker host itself (to vsftpd's published
    address and through docker-proxy), without and with ``ftpalg run`` in the Docker host;
    prints the matrix. Removes everything it made, also on failure or Ctrl-C."""
    from .lab import ftpalg_argv

    lab = DockerLab(prefix)
    todo = cells() + [Cell(c.client, c.mode, c.kind, where) for where in (PUBLISHED["vsftpd"], "127.0.0.1")
                      for c in cells(("vsftpd",))]
    try:
        lab.up()
        lab.start_docker()
        without = run_cells(lab, todo)
        before = lab.ruleset()
        p = lab.start_ftpalg()
        try:
            with_ = run_cells(lab, todo)
        finally:
            rc = lab.stop_ftpalg(p)
        same = lab.ruleset() == before
        log = lab.ftpalg_log()
    finally:
        lab.down()
    for c in todo:
        print(f"{c.label:58} {'ok' if without[c].ok else 'FAIL'} -> {'ok' if with_[c].ok else 'FAIL'}"
              f"   {'' if with_[c].ok else with_[c].detail}")
    outside = [c for c in todo if not c.local]
    print(f"outside client: {sum(without[c].ok for c in outside)}/{len(outside)} without ftpalg, "
          f"{sum(with_[c].ok for c in outside)}/{len(outside)} with; {' '.join(ftpalg_argv())} run exit {rc}, "
          f"ruleset after exit as found: {same}; not_forwarded warnings: {log.count('WARNING not_forwarded')}")
    return 0 if rc == 0 and same and all(with_[c].ok for c in outside) else 1


if __name__ == "__main__":
    raise SystemExit(main())
