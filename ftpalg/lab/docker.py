"""Docker's engine (Debian's ``docker.io``) inside a lab namespace, and images built here.

``Dockerd(ns, root)`` runs ``dockerd`` in network namespace ``ns`` with every path of its own
under ``root`` (data, exec root, socket, pid file, log), so several can run at once, each in
its namespace, none touching the host's Docker (if any)::

    with Dockerd("lab-h", Path("/var/tmp/x")) as d:     # start() ... close(), also on Ctrl-C
        d.import_image(rootfs_dir, "lab/ftp")           # no registry: a root file system, imported
        d.run_container("ftp1", "lab/ftp", ["vsftpd", "/conf"], publish=["21:21"], init=True)
        d.docker("ps")

How it runs here (``ip netns exec`` gives a private mount namespace whose /sys is a new
sysfs with an empty /sys/fs/cgroup): a shell started in the namespace mounts the host's
cgroup file systems again (the same hierarchies as the host's: ``cgroup_mounts``; the cgroup
v1 set the lab's machine has when the host shows none), a tmpfs on /etc/docker (dockerd writes
its key.json there) and a tmpfs on /run (dockerd writes /run/docker/plugins, containerd its
shim sockets under /run/containerd) into which the host's entries of /run are bound back (the
lab's state in /run/ftpalg-lab, /run/netns, ...), then execs ``dockerd --data-root
--exec-root --pidfile -H unix://...``. None of these mounts is seen outside: the namespace
is a slave of the host's, and it ends with dockerd's last process. Containers get cgroups
under a parent of their own (``cgroup_parent``): ``close()`` kills whatever is left in it
(a container whose dockerd was killed) and removes it.

dockerd installs its usual iptables rules in the namespace (FORWARD policy DROP, DOCKER-USER,
DOCKER-ISOLATION-STAGE-1/2, DOCKER with a DNAT per published port, MASQUERADE of the bridge)
and starts ``docker-proxy`` for each published port (it serves clients on the Docker host
itself). The client is the package's ``/usr/bin/docker`` (``DOCKER``), always with ``-H``.

``ftp_rootfs(dest)`` builds the root file system of an image holding the lab's FTP servers
(vsftpd, proftpd, pure-ftpd: their binaries and the libraries ``ldd`` lists, /etc/passwd
and /etc/group copied from the host so that ftp, nobody and nogroup have the host's ids),
and ``server_container(kind, files, state)`` the ``docker run`` options and command of one
server in it, serving the lab's files. vsftpd as PID 1 crashed after a session (no
reaping of its session processes): it needs ``--init``. Not for production paths.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import servers
from .netns import LabError, kill_namespace_processes, popen_in, run, stop_processes

DOCKER = "/usr/bin/docker"  # the package's client; another on PATH may be anything
DOCKERD = "/usr/sbin/dockerd"
PROGRAMS = (DOCKER, DOCKERD, "/usr/bin/containerd", "/usr/bin/containerd-shim-runc-v2", "/usr/sbin/docker-proxy",
            "/usr/bin/docker-init")
PACKAGE = "docker.io"
CGROUP = Path("/sys/fs/cgroup")
# The machine this was written on mounts these (cgroup v1 and cgroup2 on "unified").
DEFAULT_CGROUPS = (*[("cgroup", c, c) for c in ("cpu", "cpuacct", "cpuset", "memory", "devices", "freezer",
                                                "blkio", "pids")],
                   ("cgroup", "systemd", "none,name=systemd"), ("cgroup2", "unified", ""))
_GENERIC_OPTIONS = {"rw", "ro", "relatime", "noatime", "nosuid", "nodev", "noexec", "seclabel"}


def missing() -> list[str]:
    """The programs of Docker's engine that are not installed (``./dev.sh setup`` installs
    the ``docker.io`` package); runc is looked up on PATH."""
    out = [p for p in PROGRAMS if not os.access(p, os.X_OK)]
    return out + ([] if shutil.which("runc") else ["runc"])


def cgroup_mounts(mounts: str | None = None) -> tuple[bool, list[tuple[str, str, str]]]:
    """How the host mounts its cgroups under /sys/fs/cgroup (``mounts``: text of
    /proc/self/mounts, read when None): (a tmpfs at /sys/fs/cgroup holds them, [(type,
    directory below /sys/fs/cgroup or "" for /sys/fs/cgroup itself, options)]). Without any:
    the v1 set of ``DEFAULT_CGROUPS``."""
    if mounts is None:
        mounts = Path("/proc/self/mounts").read_text()
    found: dict[str, tuple[str, str, str]] = {}
    tmpfs = False
    for line in mounts.splitlines():
        f = line.split()
        if len(f) < 4:
            continue
        point = f[1]
        if point == str(CGROUP) and f[2] == "tmpfs":
            tmpfs = True
        if f[2] not in ("cgroup", "cgroup2") or not (point == str(CGROUP) or point.startswith(f"{CGROUP}/")):
            continue
        sub = point[len(str(CGROUP)) + 1:]
        if "/" in sub:
            continue
        found[sub] = (f[2], sub, ",".join(o for o in f[3].split(",") if o not in _GENERIC_OPTIONS))
    if not found:
        return True, list(DEFAULT_CGROUPS)
    return tmpfs or "" not in found, list(found.values())


def start_script(root: Path, argv: list[str], mounts: tuple[bool, list[tuple[str, str, str]]]) -> str:
    """The shell script that prepares the namespace's private mounts and execs ``argv``
    (see the module's docstring). ``root``: dockerd's own directory (``hostrun`` in it is
    where the host's /run stays reachable)."""
    tmpfs, cgroups = mounts
    lines = ["set -e"]
    if tmpfs:
        lines.append(f"mount -t tmpfs -o mode=755 cgroup_root {CGROUP}")
    for fstype, sub, opts in cgroups:
        point = f"{CGROUP}/{sub}" if sub else str(CGROUP)
        if sub:
            lines.append(f"mkdir -p {point}")
        o = f" -o {opts}" if opts else ""
        lines.append(f"mount -t {fstype}{o} {fstype} {point}")
    hostrun = root / "hostrun"
    lines += [
        "mount -t tmpfs -o mode=755 etc_docker /etc/docker" if Path("/etc/docker").is_dir() else ":",
        f"mkdir -p {hostrun}",
        f"mount --rbind /run {hostrun}",
        "mount -t tmpfs -o mode=755 run /run",
        f"for e in {hostrun}/* {hostrun}/.[!.]*; do",
        '    n=${e##*/}',
        '    case $n in docker|containerd|"*"|".[!.]*") continue;; esac',
        '    if [ -L "$e" ]; then cp -P "$e" "/run/$n"',
        '    elif [ -d "$e" ]; then mkdir "/run/$n" && mount --rbind "$e" "/run/$n"',
        '    elif [ -e "$e" ]; then : > "/run/$n" && mount --bind "$e" "/run/$n"; fi',
        "done",
        'exec "$@"',
    ]
    return "\n".join(lines) + "\n"


@dataclass
class Dockerd:
    """dockerd (with its containerd) in namespace ``ns``, its files under ``root`` (created
    by ``start``, removed by ``close``). ``bip``: the bridge's address (``--bip``), else
    Docker's default 172.17.0.1/16. ``cgroup_parent``: the cgroup its containers go under
    (default: ``ftpalg-<ns>``). ``options``: more of dockerd's options."""

    ns: str
    root: Path
    bip: str | None = None
    cgroup_parent: str = ""
    options: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.cgroup_parent = self.cgroup_parent or f"ftpalg-{self.ns}"

    @property
    def sock(self) -> Path:
        return self.root / "docker.sock"

    @property
    def log(self) -> Path:
        return self.root / "dockerd.log"

    def argv(self) -> list[str]:
        return [DOCKERD, "--data-root", str(self.root / "data"), "--exec-root", str(self.root / "exec"),
                "--pidfile", str(self.root / "docker.pid"), "-H", f"unix://{self.sock}",
                # cgroupfs: the systemd driver (dockerd's choice on a cgroup2 host with systemd)
                # would ask the host's systemd for scopes
                "--exec-opt", "native.cgroupdriver=cgroupfs", "--cgroup-parent", f"/{self.cgroup_parent}",
                "--shutdown-timeout", "3",
                "--log-level", "warn", *(["--bip", self.bip] if self.bip else []), *self.options]

    # ---- the daemon ----------------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> None:
        """Start dockerd (the same data as before if it ran here already) and wait until it
        answers; LabError (with its log) if it does not."""
        if self.proc is not None and self.proc.poll() is None:
            return
        missed = missing()
        if missed:
            raise LabError(f"Docker's engine is not installed ({', '.join(missed)}): apt-get install {PACKAGE}")
        self.root.mkdir(parents=True, exist_ok=True)
        script = self.root / "start.sh"
        script.write_text(start_script(self.root, self.argv(), cgroup_mounts()))
        self.proc = popen_in(self.ns, ["sh", str(script), *self.argv()], self.log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            if self.sock.exists() and self.docker("version", "--format", "{{.Server.Version}}", check=False,
                                                  timeout=10).returncode == 0:
                return
            time.sleep(0.1)
        text = self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
        self.stop()
        raise LabError(f"dockerd did not start in {self.ns}:\n{text}")

    def stop(self, timeout: float = 20.0) -> None:
        """Stop dockerd as its service does (SIGTERM: it stops the containers, keeps its data
        and its iptables rules); SIGKILL to its process group after ``timeout`` seconds."""
        p, self.proc = self.proc, None
        if p is not None:
            stop_processes([p], timeout)

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop dockerd, kill what is left of it and its containers, remove ``root``."""
        try:
            self.stop()
        finally:
            self._kill_leftovers()
            shutil.rmtree(self.root, ignore_errors=True)

    def _kill_leftovers(self) -> None:
        # containerd's shims (daemons) stay in the namespace; the containers' processes are
        # in namespaces of their own, found by their cgroups.
        if self.ns in run(["ip", "netns", "list"]).stdout.split():
            kill_namespace_processes([self.ns])
        _, cgroups = cgroup_mounts()
        dirs = [CGROUP / sub / self.cgroup_parent for _, sub, _ in cgroups]
        dirs = [d for d in dirs if d.is_dir()]
        for _ in range(100):
            pids = {int(pid) for d in dirs for procs in d.rglob("cgroup.procs")
                    for pid in _read(procs).split()}
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        for d in dirs:
            for sub in sorted((x for x in d.rglob("*") if x.is_dir()), key=lambda x: -len(x.parts)):
                with contextlib.suppress(OSError):
                    sub.rmdir()
            with contextlib.suppress(OSError):
                d.rmdir()

    def __enter__(self) -> Dockerd:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- the client ----------------------------------------------------------------------
    def docker(self, *args: str, check: bool = True, timeout: float = 60,
               input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run the Docker client against this dockerd."""
        return run([DOCKER, "-H", f"unix://{self.sock}", *args], check=check, timeout=timeout, input=input)

    def import_image(self, rootfs: Path, tag: str, timeout: float = 600) -> None:
        """``docker import`` the directory ``rootfs`` as image ``tag`` (no registry needed)."""
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "--numeric-owner", "-c", "."], stdout=subprocess.PIPE)
        try:
            p = subprocess.run([DOCKER, "-H", f"unix://{self.sock}", "import", "-", tag], stdin=tar.stdout,
                               capture_output=True, text=True, timeout=timeout)
        finally:
            assert tar.stdout is not None
            tar.stdout.close()
            tar.wait()
        if p.returncode != 0 or tar.returncode != 0:
            raise LabError(f"docker import {tag} failed: {p.stderr.strip()}")

    def run_container(self, name: str, image: str, argv: list[str], publish: list[str] | tuple[str, ...] = (),
                      volumes: list[str] | tuple[str, ...] = (), init: bool = False,
                      extra: list[str] | tuple[str, ...] = ()) -> str:
        """``docker run -d`` a container named ``name`` (``--restart always``: it comes back
        with dockerd); ``publish``: ``-p`` values; ``volumes``: ``-v`` values; ``init``:
        docker-init as PID 1. Returns its id."""
        args = ["run", "-d", "--name", name, "--restart", "always", *(["--init"] if init else [])]
        args += [a for p in publish for a in ("-p", p)] + [a for v in volumes for a in ("-v", v)]
        return self.docker(*args, *extra, image, *argv).stdout.strip()

    def address(self, name: str) -> str:
        """The container's address on Docker's default bridge."""
        return self.docker("inspect", "-f", "{{.NetworkSettings.IPAddress}}", name).stdout.strip()

    def running(self, name: str) -> bool:
        p = self.docker("inspect", "-f", "{{.State.Running}}", name, check=False)
        return p.stdout.strip() == "true"


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


# ---- an image of the lab's FTP servers ---------------------------------------------------------
FTP_KINDS = ("vsftpd", "proftpd", "pure-ftpd")
"""The lab's servers that run in the image (pyftpdlib would need a Python)."""
_LDD = re.compile(r"(/\S+) \(0x[0-9a-f]+\)")


def binaries() -> dict[str, str]:
    """kind -> the host's binary of each server of the image."""
    return {"vsftpd": shutil.which("vsftpd") or "/usr/sbin/vsftpd",
            "proftpd": servers.packaged_binary("proftpd-core", "proftpd"),
            "pure-ftpd": servers.packaged_binary("pure-ftpd", "pure-ftpd")}


def libraries(binary: str) -> list[str]:
    """The shared libraries ``ldd`` lists for ``binary`` (the loader included)."""
    return sorted(set(_LDD.findall(run(["ldd", binary]).stdout)))


def ftp_rootfs(dest: Path) -> Path:
    """Fill ``dest`` with a root file system holding the lab's FTP servers (``FTP_KINDS``,
    at /usr/sbin/<name>) and their libraries; /etc/passwd and /etc/group from the host."""
    files: set[str] = set()
    for kind, path in binaries().items():
        target = dest / "usr" / "sbin" / kind
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
        files.update(libraries(path))
    for lib in sorted(files):
        real = os.path.realpath(lib)
        target = dest / lib.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(real, target)
    etc = dest / "etc"
    etc.mkdir(exist_ok=True)
    for name in ("passwd", "group"):
        shutil.copy2(f"/etc/{name}", etc / name)
    (etc / "nsswitch.conf").write_text("passwd: files\ngroup: files\nshadow: files\nhosts: files\n")
    for d in ("tmp", "run", "srv/ftp", "var/run", "dev", "proc", "sys"):
        (dest / d).mkdir(parents=True, exist_ok=True)
    (dest / "tmp").chmod(0o1777)
    return dest


@dataclass(frozen=True)
class ServerContainer:
    """How to run one of the image's servers: ``docker run`` options and the command."""

    volumes: tuple[str, ...]
    argv: tuple[str, ...]
    init: bool  # docker-init as PID 1 (vsftpd)
    extra: tuple[str, ...] = ()  # more ``docker run`` options


def server_container(kind: str, files: Path, state: Path) -> ServerContainer:
    """Server ``kind`` of the image on port 21 of all the container's addresses, serving
    ``files`` (the lab's anonymous root, uploads into ``files/upload``), its configuration
    and logs in ``state``: both mounted at the same paths, so that the configuration that
    ``servers.server_command`` writes holds. pure-ftpd needs CAP_DAC_READ_SEARCH and
    CAP_SYS_NICE (without them it exits 252 at once, saying nothing)."""
    state.mkdir(parents=True, exist_ok=True)
    argv = servers.server_command(kind, "0.0.0.0", files, state)
    volumes = [f"{files}:{files}", f"{state}:{state}"]
    extra: list[str] = []
    if kind == "pure-ftpd":
        # The wrapper's private mounts become volumes (a container may not mount): the ftp
        # user's home and /run. The server's argv follows the wrapper's arguments
        # (sh -c SCRIPT NAME ROOT HOME STATE ARGV...).
        i = argv.index(servers.PURE_FTPD_MOUNTS)
        volumes = [f"{files}:{argv[i + 3]}", f"{state}:/run"]
        argv = argv[i + 5:]
        extra = ["--cap-add", "DAC_READ_SEARCH", "--cap-add", "SYS_NICE"]
    argv[0] = f"/usr/sbin/{kind}"
    return ServerContainer(tuple(volumes), tuple(argv), kind == "vsftpd", tuple(extra))
