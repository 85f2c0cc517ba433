"""A real systemd as PID 1 of a container around a lab namespace: ftpalg's unit tried the way
an admin runs it (``systemctl restart``, a crash restarted by the unit, an upgrade, a stop).

The container is built from what the machine already has, in about a second and a half, with
no image and no container engine: new mount, PID, UTS, IPC and cgroup namespaces (util-linux
``unshare``) inside the lab namespace given (so systemd's services see its interfaces and
its ruleset), a tmpfs root holding the host's ``/usr`` read-only (merged-usr symlinks to it),
a small ``/etc`` of its own (the accounts, the dynamic linker's cache, the ``alternatives``
links of iptables, ``/etc/systemd/system`` empty: none of the host's enabled services),
a writable ``/usr/local`` over the host's (overlayfs), ``/proc``, a read-only ``/sys`` of the
namespace, ``/sys/fs/cgroup`` the cgroup2 hierarchy
rooted at a cgroup made for it, and a minimal ``/dev``. ``/usr/lib/systemd/systemd`` then
boots ``multi-user.target`` as PID 1 with ``container=ftpalg-lab``: journald, D-Bus and
logind start, and ``systemctl`` works as on a gateway. Needs root and the ``systemd`` package
(nothing of it runs on the host). Directories given as ``binds`` are shared with the host
(the installation under ``/opt``, a wheelhouse). Files can also be put in through
``/proc/PID/root`` (``path()``).

``shutdown()`` powers the container off (systemd stops its services: ftpalg's unit removes
its rules), then removes the cgroups; killing the namespace's processes (``Lab.down``) takes
it down too, PID 1 first. Not for production paths.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from .netns import LabError

SYSTEMD = Path("/usr/lib/systemd/systemd")
CLEAN_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
# What of the host's /etc the container gets (the rest of /etc would enable the host's services)
ETC = ("passwd", "group", "shadow", "gshadow", "nsswitch.conf", "ld.so.cache", "ld.so.conf", "ld.so.conf.d",
       "alternatives", "protocols", "services", "hosts", "host.conf", "ethertypes", "iproute2", "xtables",
       "localtime", "login.defs", "python3", "python3.11")

# Not wanted in the container: logins (logind also needs D-Bus, not installed everywhere)
MASK = ("systemd-logind.service", "getty.target", "console-getty.service", "systemd-update-utmp.service",
        "systemd-update-utmp-runlevel.service")

# Stage 1, in a private mount namespace inside the lab namespace: a cgroup of its own (in the
# cgroup2 hierarchy, mounted here for a moment), then the namespaces of stage 2.
STAGE1 = r"""
set -eu
root=$1 cgroup=$2
mount -t cgroup2 none "$root"
mkdir "$root$cgroup"
echo $$ > "$root$cgroup/cgroup.procs"
umount "$root"
exec unshare --pid --fork --uts --ipc --cgroup bash -c "$STAGE2" stage2 "$@"
"""

# Stage 2, PID 1 of the new PID namespace: the root file system, then systemd in its place.
STAGE2 = r"""
set -eu
root=$1 name=$3
shift 3
mount -t tmpfs -o mode=755 "$name" "$root"
cd "$root"
mkdir -p usr etc proc sys dev run tmp var/tmp var/log opt srv root
ln -s usr/bin bin; ln -s usr/lib lib; ln -s usr/lib64 lib64; ln -s usr/sbin sbin
mount --bind /usr usr
mount -o remount,bind,ro usr
mkdir -p run/local  # /usr/local writable, as on a gateway (ftpalg install: man pages); /run covers it later
mount -t tmpfs -o mode=755 local run/local
mkdir -p run/local/upper run/local/work
mount -t overlay -o lowerdir=/usr/local,upperdir=run/local/upper,workdir=run/local/work overlay usr/local
for f in $ETC; do if [ -e "/etc/$f" ]; then cp -a "/etc/$f" etc/; fi; done
ln -s ../usr/lib/os-release etc/os-release
mkdir -p etc/systemd/system
for unit in $MASK; do ln -s /dev/null "etc/systemd/system/$unit"; done
od -An -N16 -tx1 /dev/urandom | tr -d ' \n' > etc/machine-id
echo >> etc/machine-id
echo "$name" > etc/hostname
hostname "$name"
chmod 1777 tmp var/tmp
chmod 700 root
while [ $# -ge 3 ]; do  # binds: host path, path inside, rw|ro
    mkdir -p ".$2"
    mount --bind "$1" ".$2"
    if [ "$3" = ro ]; then mount -o remount,bind,ro ".$2"; fi
    shift 3
done
mount -t proc proc proc
mount -t sysfs -o ro sysfs sys
mount -t cgroup2 cgroup2 sys/fs/cgroup
mount -t tmpfs -o mode=755 dev dev
for d in null zero full random urandom tty; do touch "dev/$d"; mount --bind "/dev/$d" "dev/$d"; done
mkdir dev/pts dev/shm
mount -t devpts -o newinstance,ptmxmode=0666 devpts dev/pts
ln -s pts/ptmx dev/ptmx
ln -s /proc/self/fd dev/fd
mount -t tmpfs -o mode=1777 shm dev/shm
mount -t tmpfs -o mode=755 run run
mkdir .old
pivot_root . .old
umount -l /.old
rmdir /.old
exec env -u STAGE2 -u ETC -u MASK -u SYSTEMD container=ftpalg-lab "$SYSTEMD" --unit=multi-user.target </dev/null
"""


def _exe(pid: str) -> Path | None:
    try:
        return Path(os.readlink(f"/proc/{pid}/exe")).resolve()
    except OSError:  # gone, or exec'ing
        return None


def own_cgroup() -> str:
    """This process's cgroup in the cgroup2 hierarchy (``/`` here)."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return line[3:].rstrip("/")
    raise LabError("no cgroup2 hierarchy (/proc/self/cgroup has no 0:: line): systemd needs one")


def in_cgroup2(script: str, cgroup: str) -> bool:
    """``script`` run with the cgroup2 hierarchy mounted at $1 (in a mount namespace of its own:
    the host may not have it mounted), $2 ``cgroup``; whether it exited 0."""
    with tempfile.TemporaryDirectory(prefix="ftpalg-cgroup-") as mnt:
        return subprocess.run(["unshare", "--mount", "--propagation", "private", "bash", "-c",
                               f'mount -t cgroup2 none "$1" && {{ {script}; }}', "cgroup", mnt, cgroup],
                              capture_output=True).returncode == 0


def remove_cgroup(cgroup: str, timeout: float = 5.0) -> None:
    """A container's cgroup and those systemd made in it, once their processes are gone."""
    deadline = time.monotonic() + timeout
    while not in_cgroup2('find "$1$2" -depth -type d -exec rmdir {} + 2>/dev/null; [ ! -e "$1$2" ]', cgroup):
        if time.monotonic() > deadline:
            raise LabError(f"cgroup {cgroup} could not be removed")
        time.sleep(0.1)  # its last processes are exiting


def remove_stale(prefix: str) -> None:
    """The cgroups of containers around the namespaces of lab ``prefix`` (a test run that was
    killed): every process in them killed, then removed."""
    top = own_cgroup()
    with tempfile.TemporaryDirectory(prefix="ftpalg-cgroup-") as mnt:
        listing = subprocess.run(["unshare", "--mount", "--propagation", "private", "bash", "-c",
                                  'mount -t cgroup2 none "$1" && ls "$1$2"', "ls", mnt, top or "/"],
                                 capture_output=True, text=True).stdout.split()
    for name in listing:
        if name.startswith(f"ftpalg-lab-{prefix}-"):
            in_cgroup2('echo 1 > "$1$2/cgroup.kill"', f"{top}/{name}")
            remove_cgroup(f"{top}/{name}")


class Systemd:
    """One container with systemd as PID 1 in network namespace ``netns``; ``state`` holds
    its root's mount point and its console log."""

    def __init__(self, name: str, netns: str, state: Path, binds: tuple[tuple[Path, str, bool], ...] = ()) -> None:
        self.name, self.netns, self.state, self.binds = name, netns, state, binds
        self.cgroup = f"{own_cgroup()}/ftpalg-lab-{name}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid = 0  # systemd's pid on the host
        self.failed = ""  # the units that failed during the boot (systemctl --failed)

    # ---- up and down -----------------------------------------------------------------------
    def start(self) -> None:
        """Start booting (``wait()`` for the end of it)."""
        if not SYSTEMD.exists():
            raise LabError(f"{SYSTEMD} is missing (Debian package systemd)")
        root = self.state / "root"
        root.mkdir(parents=True, exist_ok=True)
        env = {**CLEAN_ENV, "STAGE2": STAGE2, "ETC": " ".join(ETC), "MASK": " ".join(MASK), "SYSTEMD": str(SYSTEMD)}
        binds = [str(w) for host, inside, ro in self.binds for w in (host, inside, "ro" if ro else "rw")]
        with open(self.state / "console.log", "ab") as out:
            self.proc = subprocess.Popen(
                ["nsenter", f"--net=/run/netns/{self.netns}", "unshare", "--mount", "--propagation", "private",
                 "bash", "-c", STAGE1, "stage1", str(root), self.cgroup, self.name, *binds],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def wait(self, timeout: float = 30.0) -> None:
        """Until systemd has booted (``is-system-running --wait``): running, or degraded (some
        unit failed: ``failed`` names them; ftpalg's tests look at ftpalg's unit)."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while not self.pid:
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
            try:
                pids = children.read_text().split()
            except OSError:
                pids = []
            if pids and _exe(pids[0]) == SYSTEMD.resolve():
                self.pid = int(pids[0])
            elif self.proc.poll() is not None or time.monotonic() > deadline:
                raise LabError(f"systemd did not start in {self.netns}:\n{self.console()}")
            else:
                time.sleep(0.02)
        while True:
            res = self.run(["systemctl", "is-system-running", "--wait"], check=False,
                           timeout=max(1.0, deadline - time.monotonic()))
            state = res.stdout.strip()
            if state in ("running", "degraded"):
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise LabError(f"systemd in {self.netns} did not boot ({state or res.stderr.strip()}):\n"
                               f"{self.console()}")
            time.sleep(0.05)  # its private socket is not there yet
        if state == "degraded":
            self.failed = self.run(["systemctl", "--failed", "--no-legend", "--plain"], check=False).stdout

    def shutdown(self, timeout: float = 20.0) -> None:
        """Power off (the services stopped the ordinary way), then the cgroups removed; every
        process of the container killed (``cgroup.kill``) if it does not go within ``timeout``."""
        if self.proc is not None and self.proc.poll() is None:
            if self.pid:
                os.kill(self.pid, signal.SIGRTMIN + 4)  # systemd: poweroff
            try:
                self.proc.wait(timeout if self.pid else 0)
            except subprocess.TimeoutExpired:
                in_cgroup2('echo 1 > "$1$2/cgroup.kill"', self.cgroup)
                self.proc.wait(10)
        remove_cgroup(self.cgroup)

    # ---- inside ----------------------------------------------------------------------------
    def argv(self, argv: list[str]) -> list[str]:
        """``argv`` run inside (every namespace of PID 1, its root, a service's clean environment)."""
        return ["nsenter", "-t", str(self.pid), "-a", "env", "-i", *(f"{k}={v}" for k, v in CLEAN_ENV.items()),
                *argv]

    def run(self, argv: list[str], check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(self.argv(argv), capture_output=True, text=True, timeout=timeout)
        if check and res.returncode != 0:
            raise LabError(f"{' '.join(argv)} in {self.name} failed ({res.returncode}):\n{res.stdout}{res.stderr}")
        return res

    def systemctl(self, *args: str, check: bool = True) -> str:
        return self.run(["systemctl", "--no-pager", *args], check=check).stdout

    def show(self, unit: str, *props: str) -> dict[str, str]:
        """``systemctl show -p ...`` as a dict."""
        out = self.systemctl("show", unit, *(f"-p{p}" for p in props))
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, unit: str, *args: str) -> str:
        """The journal of ``unit`` (its own lines and systemd's about it)."""
        return self.run(["journalctl", "--no-pager", "-u", unit, *args]).stdout

    def path(self, inside: str) -> Path:
        """A path inside the container, as seen from the host (through PID 1's root)."""
        return Path(f"/proc/{self.pid}/root") / inside.lstrip("/")

    def console(self) -> str:
        return (self.state / "console.log").read_text(errors="replace")[-3000:]
