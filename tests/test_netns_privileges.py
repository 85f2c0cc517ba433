"""``ftpalg run`` as an unprivileged user with only CAP_NET_ADMIN (what the systemd unit
gives it), started in the lab's gateway with ``setpriv``: uid/gid 65534, no groups, and
CAP_NET_ADMIN alone in the permitted, effective, inheritable, ambient and bounding sets
(ambient: the nft and iptables it runs keep it), no_new_privs. It installs its rules (nft
and iptables-nft: netlink only, no lock file), binds its queue, opens a pinhole over
ctnetlink, and removes its rules on SIGTERM. Without CAP_NET_ADMIN, or with it only in a user
namespace of its own, it exits 1 with a message naming the capability and changes nothing.

The interpreter must be one the user can read: the lab's venv may live under root's home
(0700); then the system's python of the same version runs ftpalg from this tree, as a
deployment under /opt or /usr would. ``env`` execs it as nobody: setpriv itself execs while
it still holds root's capabilities (keepcaps; they go at that exec), so it reaches an
interpreter under /root that then cannot read its own library and silently takes another."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import netfilterqueue
import pytest
from needs import need

import ftpalg
from ftpalg.lab import lab as lab_module
from ftpalg.lab.lab import CLIENTS, GW_PUBLIC, SERVERS, Lab, ftpalg_argv, sha256
from netns_checks import no_pinholes_soon

pytestmark = pytest.mark.netns

NOBODY = 65534
CAP_NET_ADMIN = 12
ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
FILE = "small.txt"


def setpriv(caps: str) -> list[str]:
    """Become nobody with exactly ``caps`` (e.g. "+net_admin", or "" for none) in every set."""
    sets = f"-all,{caps}" if caps else "-all"
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", f"--inh-caps={sets}",
            f"--ambient-caps={sets}", f"--bounding-set={sets}", "--no-new-privs", "--"]


@pytest.fixture(scope="module")
def nobody_ftpalg() -> list[str]:
    """How uid 65534 starts ftpalg (after ``setpriv``): ``env`` execs it as that user, so
    its path and library are checked with that user's rights."""
    need(shutil.which("setpriv"), "setpriv (util-linux)")
    env = shutil.which("env") or "/usr/bin/env"
    site = str(Path(netfilterqueue.__file__).resolve().parent.parent)
    system = f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"
    system_python = [env, f"PYTHONPATH={ROOT}:{site}", system]
    candidates = [([env, sys.executable], [env, *ftpalg_argv()]),  # (its python, how it runs ftpalg)
                  (system_python, [*system_python, "-m", "ftpalg"])]
    probe = "import ftpalg, netfilterqueue; print(ftpalg.__file__)"

    def runs_this_tree(python: list[str]) -> bool:
        res = subprocess.run([*setpriv(""), *python, "-c", probe], capture_output=True, text=True, cwd="/")
        return res.returncode == 0 and res.stdout.strip() == str(Path(ftpalg.__file__).resolve())

    found = next((argv for python, argv in candidates if runs_this_tree(python)), None)
    need(found, "a python that uid 65534 may read, running this tree's ftpalg (a checkout others may read)")
    return found


@pytest.fixture
def as_nobody(lab, monkeypatch, nobody_ftpalg):
    """``lab.start_ftpalg`` (its readiness wait and log) starting ftpalg as nobody with only
    CAP_NET_ADMIN."""
    monkeypatch.setattr(lab_module, "ftpalg_argv", lambda: [*setpriv("+net_admin"), *nobody_ftpalg])
    return lab


def saved(text: str) -> str:
    """iptables-save's output without its dates and counters."""
    lines = [line for line in text.splitlines() if not line.startswith("#")]
    return re.sub(r"\[\d+:\d+\]", "[0:0]", "\n".join(lines))


def rules(lab: Lab) -> tuple[str, str, str]:
    """What must be the same before ftpalg starts and after it exits: the gateway's nft
    ruleset and its iptables rules, IPv4 and IPv6."""
    return lab.ruleset(), saved(lab.gw_rules()), saved(lab.gw_rules6())


def status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def check_only_net_admin(pid: int) -> None:
    st = status(pid)
    assert st["Uid"].split() == [str(NOBODY)] * 4 and st["Gid"].split() == [str(NOBODY)] * 4, st
    assert st["Groups"] == ""
    for key in ("CapEff", "CapPrm", "CapBnd", "CapInh", "CapAmb"):
        assert int(st[key], 16) == 1 << CAP_NET_ADMIN, (key, st[key])
    assert st["NoNewPrivs"] == "1"


ACTIVE_SESSION = textwrap.dedent("""
    import ftplib, hashlib, socket, sys
    server, me, name = sys.argv[1:4]
    ftp = ftplib.FTP(timeout=10)
    ftp.connect(server, 21)
    ftp.login()
    ftp.voidcmd("TYPE I")
    ls = socket.create_server((me, 0))
    print(ls.getsockname()[1], ftp.sendport(me, ls.getsockname()[1]), flush=True)
    input()  # the test looks at the gateway's expectations meanwhile
    ftp.putcmd("RETR " + name)
    ftp.getresp()
    conn, _ = ls.accept()
    h = hashlib.sha256()
    while chunk := conn.recv(65536):
        h.update(chunk)
    conn.close()
    ftp.voidresp()
    print(h.hexdigest(), flush=True)
    ftp.quit()
""")


def children(pid: int) -> list[int]:
    """The worker processes of ``pid`` (its children that are ftpalg workers)."""
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for c in (task / "children").read_text().split():
            if "spawn_main" in Path(f"/proc/{c}/cmdline").read_text().replace("\0", " "):
                out.append(int(c))
    return out


def active_transfer_with_pinhole(lab: Lab) -> None:
    """PORT from behind gw's MASQUERADE: while announced, exactly one expectation from the
    server to the gateway's public address; then the file arrives intact."""
    client = subprocess.Popen(["ip", "netns", "exec", lab.client, sys.executable, "-c", ACTIVE_SESSION,
                               SERVERS["vsftpd"], CLIENTS[0], FILE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    assert client.stdin is not None and client.stdout is not None
    try:
        port, reply = client.stdout.readline().split(" ", 1)
        assert reply.startswith("200"), reply
        (exp,) = lab.expectations()
        assert f"src={SERVERS['vsftpd']} dst={GW_PUBLIC} sport=0" in exp, exp
        client.stdin.write("\n")
        client.stdin.flush()
        assert client.stdout.readline().strip() == sha256(lab.files / FILE)
        assert client.wait(10) == 0
    finally:
        client.kill()
        client.wait()
    assert no_pinholes_soon(lab)
    assert "pinhole open" in lab.ftpalg_log(), lab.ftpalg_log()


@pytest.mark.parametrize("workers", [[], ["--workers", "2"]], ids=["one-process", "two-workers"])
def test_runs_as_nobody_with_only_cap_net_admin(as_nobody, workers):
    """Also with workers: they are started by exec (spawn) and keep the ambient capability
    the unit gives, nothing more."""
    lab = as_nobody
    before = rules(lab)
    p = lab.start_ftpalg(*workers)
    try:
        check_only_net_admin(p.pid)  # ip netns exec, setpriv and env exec: the same pid
        workers_seen = children(p.pid)
        assert len(workers_seen) == (2 if workers else 0), workers_seen
        for child in workers_seen:
            check_only_net_admin(child)
        assert "rules installed" in lab.ftpalg_log()
        assert "table inet ftpalg" in lab.ruleset()
        active_transfer_with_pinhole(lab)
    finally:
        rc = lab.stop_ftpalg(p)
    assert rc == 0, lab.ftpalg_log()
    assert "rules removed" in lab.ftpalg_log() and "Traceback" not in lab.ftpalg_log()
    assert rules(lab) == before


def test_no_rules_mode_as_nobody(as_nobody):
    """Root loads deploy/ files; ftpalg then needs only the queue and ctnetlink."""
    lab = as_nobody
    lab.ns(lab.gw, ["nft", "-f", str(DEPLOY / "ftpalg.nft")])
    for restore, path in (("iptables-restore", "queue.iptables"), ("ip6tables-restore", "queue.ip6tables")):
        subprocess.run(["ip", "netns", "exec", lab.gw, restore, "--noflush"], input=(DEPLOY / path).read_text(),
                       text=True, check=True)
    try:
        loaded = lab.ruleset()
        p = lab.start_ftpalg("--no-rules")
        try:
            check_only_net_admin(p.pid)
            active_transfer_with_pinhole(lab)
        finally:
            rc = lab.stop_ftpalg(p)
        assert rc == 0, lab.ftpalg_log()
        assert lab.ruleset() == loaded  # the admin's rules stay
    finally:
        lab.ns(lab.gw, [sys.executable, "-c", "from ftpalg.linux.rules import StaticRules; "
                                              "StaticRules([21], 0).remove()"])


@pytest.mark.parametrize("how", ["no-capabilities", "user-namespace-root"])
@pytest.mark.parametrize("mode", [[], ["--no-rules"]], ids=["rules", "no-rules"])
def test_without_cap_net_admin_fails_clearly_and_changes_nothing(lab, nobody_ftpalg, how, mode):
    """No capability at all, or every capability but in a user namespace of its own (the
    network namespace belongs to root's: nfnetlink checks CAP_NET_ADMIN there)."""
    userns = ["unshare", "--user", "--map-root-user"] if how == "user-namespace-root" else []
    if userns:
        need(subprocess.run([*setpriv(""), *userns, "true"], capture_output=True).returncode == 0,
             "unprivileged user namespaces (uid 65534 runs unshare --user)")
    before = rules(lab)
    res = lab.ns(lab.gw, [*setpriv(""), *userns, *nobody_ftpalg, "run", *mode], check=False, timeout=30)
    assert res.returncode == 1, res.stderr
    assert "Operation not permitted" in res.stderr and "needs CAP_NET_ADMIN" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    assert rules(lab) == before
    assert "@ftpalg-run" not in lab.ns(lab.gw, ["cat", "/proc/net/unix"]).stdout
