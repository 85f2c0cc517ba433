"""FTP servers in Docker containers that publish only their control port (``-p ADDR:21:21``,
no passive range, no public address configured), behind Docker's own ruleset, with
``ftpalg run`` (no options) in the Docker host's namespace (``ftpalg.lab.dockerhost``:
Debian's dockerd in a lab namespace, vsftpd, proftpd and pure-ftpd in containers of an
image built here, an outside client). Every download is checked by SHA-256.

* ftpalg started before dockerd: every mode of ftplib and curl (PORT, EPRT, PASV with the
  227 address trusted, PASV to the control connection's peer, EPSV) works; after ftpalg's
  exit the ruleset is Docker's, exactly as it was while both ran without ftpalg's parts;
* without ftpalg: every passive mode fails (the 227 names the container's address, which the
  client cannot reach; the port of a 227 or 229 is not published), active modes work;
* ftpalg started after dockerd: everything works, and the ruleset after its exit is exactly
  as found (``nft list ruleset`` and ``iptables-save``);
* dockerd restarted under ftpalg (its containers come back), then a container restarted:
  everything still works, and after ftpalg's exit the ruleset is Docker's, ftpalg's parts gone;
* clients on the Docker host itself (to the published address: Docker's DNAT in OUTPUT; to
  127.0.0.1: docker-proxy): ftpalg cannot serve them (the host opened those connections, the
  kernel gave them no helper): the same outcome as without ftpalg, one ``not_forwarded``
  warning, no pinhole_failed, refused or unsolicited lines.

The lean matrix here (vsftpd in every mode of ftplib and curl, the other servers in four);
``ftpalg demo`` runs every client (lftp, wget, tnftp too) with every server.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from needs import need
from test_netns_firewalls import admin_tables, blocks

from ftpalg.lab import docker
from ftpalg.lab.dockerhost import PASV_PEER, PUBLISHED, Cell, DockerLab, Outcome, cells, run_cells

pytestmark = pytest.mark.netns

PASSIVE = ("PASV", PASV_PEER, "EPSV")
SOME = {("ftplib", "PASV"), ("ftplib", "PORT"), ("curl", PASV_PEER), ("curl", "EPSV")}
LEAN = (cells(("vsftpd",), ("ftplib", "curl"))
        + [c for c in cells(("proftpd", "pure-ftpd"), ("ftplib", "curl")) if (c.client.name, c.mode) in SOME])
LOCAL = [Cell(c.client, c.mode, "vsftpd", where) for where in (PUBLISHED["vsftpd"], "127.0.0.1")
         for c in cells(("vsftpd",), ("ftplib", "curl")) if (c.client.name, c.mode) in SOME | {("ftplib", "EPSV")}]
AFTER_RESTART = [c for c in LEAN if c.client.name == "ftplib" and c.mode in ("PASV", "EPSV", "PORT")
                 or (c.client.name, c.mode, c.kind) == ("curl", PASV_PEER, "vsftpd")]
DOCKER_RULES = ["-P FORWARD DROP", "-A FORWARD -j DOCKER-USER", "-A FORWARD -j DOCKER-ISOLATION-STAGE-1",
                "-A FORWARD -o docker0 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
                "-A FORWARD -o docker0 -j DOCKER", "-A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE",
                *[f"-A DOCKER -d {a}/32 ! -i docker0 -p tcp -m tcp --dport 21 -j DNAT --to-destination"
                  for a in PUBLISHED.values()]]


def table(results: dict[Cell, Outcome]) -> str:
    return "\n".join(f"  {c.label:52} {o.detail}" for c, o in results.items())


def iptables_save(lab: DockerLab) -> list[str]:
    """iptables-save of the Docker host, without its comments."""
    return [line for line in lab.ns(lab.host, ["iptables-save"]).stdout.splitlines() if not line.startswith("#")]


def check_docker_rules(lab: DockerLab) -> None:
    text = "\n".join(iptables_save(lab)).replace(":FORWARD DROP [0:0]", "-P FORWARD DROP")
    missing = [r for r in DOCKER_RULES if r not in text]
    assert not missing, f"Docker's rules missing: {missing}\n{text}"
    assert "ftpalg" not in lab.ruleset().lower()


def check_log(lab: DockerLab) -> str:
    log = lab.ftpalg_log()
    assert "Traceback" not in log
    return log


@pytest.fixture(scope="module")
def lab():
    missing = docker.missing()
    need(not missing, f"Docker's engine: {', '.join(missing)} (./dev.sh setup installs docker.io)")
    lab = DockerLab(f"fd{os.getpid()}")
    lab.up()
    try:
        yield lab
    finally:
        root, parent = lab.docker_root, Path("/sys/fs/cgroup/pids") / f"ftpalg-{lab.host}"
        lab.down()
        assert not lab.leftovers() and not root.exists() and not parent.exists()


@pytest.fixture(scope="module")
def without() -> dict[Cell, Outcome]:
    """The outcomes without ftpalg (filled by test_without_ftpalg_...)."""
    return {}


def served(lab, rc: int, results) -> None:
    """ftpalg exited 0, and every transfer but those of clients on the Docker host itself
    (which no kernel-path ALG can serve) worked with it."""
    assert rc == 0
    failed = {c: o for c, o in results.items() if not c.local and not o.ok}
    assert not failed, f"failed with ftpalg:\n{table(failed)}\n{lab.ftpalg_log()[-3000:]}"


def test_ftpalg_started_before_dockerd(lab):
    before = lab.ruleset()
    p = lab.start_ftpalg()
    try:
        lab.start_docker()
        results = run_cells(lab, LEAN)
        during = lab.ruleset()
    finally:
        rc = lab.stop_ftpalg(p)
    served(lab, rc, results)
    # what Docker added while ftpalg ran is all that is left: ftpalg's own parts are gone
    assert blocks(lab.ruleset()) == admin_tables(during, before)
    check_docker_rules(lab)
    check_log(lab)


def test_without_ftpalg_passive_modes_fail(lab, without):
    results = run_cells(lab, LEAN + LOCAL)
    without.update(results)
    wrong = {c: o for c, o in results.items() if not c.local and o.ok == (c.mode in PASSIVE)}
    assert not wrong, f"without ftpalg, passive must fail and active work:\n{table(results)}"


def test_ftpalg_started_after_dockerd(lab, without):
    need(without, "the outcomes without ftpalg (test_without_ftpalg_passive_modes_fail)")
    before, saved = lab.ruleset(), iptables_save(lab)
    p = lab.start_ftpalg()
    try:
        results = run_cells(lab, LEAN + LOCAL)
    finally:
        rc = lab.stop_ftpalg(p)
    served(lab, rc, results)
    assert lab.ruleset() == before and iptables_save(lab) == saved  # exactly as found
    # clients on the Docker host itself: as without ftpalg, said once, no error spam
    local = {c: (o.ok, without[c].ok) for c, o in results.items() if c.local}
    assert all(a == b for a, b in local.values()), table({c: o for c, o in results.items() if c.local})
    log = check_log(lab)
    assert log.count("WARNING not_forwarded") == 1, log
    for spam in ("pinhole_failed", "unsolicited", "WARNING refused"):
        assert spam not in log, log


def test_dockerd_and_a_container_restarted_under_ftpalg(lab):
    before = lab.ruleset()
    p = lab.start_ftpalg()
    try:
        assert lab.dockerd is not None
        lab.dockerd.restart()  # its containers come back (restart policy "always")
        lab.wait_ports({lab.host: [(PUBLISHED[k], 21) for k in lab.kinds]}, timeout=30)
        lab.dockerd.docker("restart", "-t", "1", "vsftpd")
        lab.wait_ports({lab.host: [(PUBLISHED["vsftpd"], 21)]}, timeout=30)
        results = run_cells(lab, AFTER_RESTART)
        during = lab.ruleset()
    finally:
        rc = lab.stop_ftpalg(p)
    served(lab, rc, results)
    assert blocks(lab.ruleset()) == admin_tables(during, before)
    check_docker_rules(lab)
    check_log(lab)
