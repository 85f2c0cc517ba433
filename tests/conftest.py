"""Shared fixtures. Tests marked ``netns`` need root: they build namespace labs with real
kernel NAT, real FTP servers and clients. Without root they are skipped, loudly, or in CI
they fail (``needs.need``); in CI no test may skip at all (``_no_skip_in_ci``)."""

from __future__ import annotations

import os
import re
import subprocess

import pytest
from hypothesis import settings
from needs import in_ci, need

# Shared CI machines are slow and noisy: property tests are bounded by example counts,
# not by per-example deadlines.
settings.register_profile("ftpalg", deadline=None)
settings.load_profile("ftpalg")

# labs made by tests and bench/ (fk: test_linux_kernel's three namespaces; f6: the NAT64 lab;
# fd: the Docker host lab of test_netns_docker; fn: the service lab of test_netns_service),
# named after their pid
STALE = re.compile(r"^(f[abkl6d]\d+)-(c|gw|s|gw2|i|dc|dh)$|^(fn\d+)-(c|node2?|p\d|cp)$")


def pytest_sessionstart(session):
    """Remove labs left by an earlier run that was killed (its pid is gone)."""
    if os.geteuid() != 0:
        return
    from ftpalg.lab.dockerhost import DockerLab
    from ftpalg.lab.lab import Lab
    from ftpalg.lab.service import ServiceLab
    from ftpalg.lab.systemd import remove_stale

    try:
        names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    except OSError:
        return
    for prefix in {m.group(1) or m.group(3) for n in names if (m := STALE.match(n))}:
        if not os.path.exists(f"/proc/{prefix[2:]}"):
            kind = DockerLab if prefix.startswith("fd") else ServiceLab if prefix.startswith("fn") else Lab
            kind(prefix).down()
            remove_stale(prefix)  # test_systemd.py's containers' cgroups


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Before any fixture (the labs need root to be built)."""
    if "netns" in item.keywords:
        need(os.geteuid() == 0, "root (network namespaces, iptables, NFQUEUE)")


def _no_skip_in_ci(rep: pytest.TestReport | pytest.CollectReport) -> None:
    """In CI, a skip that did not come through ``need`` (a bare ``pytest.skip``, a ``skipif``,
    an empty parametrization, ``pytest.importorskip``) fails too: CI must not pass having run
    less than the suite. An xfail is not a skip."""
    if in_ci() and rep.skipped and not hasattr(rep, "wasxfail"):
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        rep.outcome = "failed"
        rep.longrepr = f"skipped in CI ({reason}): no test may skip in CI (tests/needs.py)"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    rep = yield
    _no_skip_in_ci(rep)
    return rep


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    rep = yield
    _no_skip_in_ci(rep)
    return rep


@pytest.fixture(scope="module")
def lab():
    """The namespace lab (every topology: client NAT, server DNAT, double NAT, IPv6; every
    server kind), built once per test module."""
    from ftpalg.lab.lab import Lab

    lab = Lab(f"fa{os.getpid()}")
    lab.up()
    yield lab
    lab.down()
    assert not lab.exists()


@pytest.fixture(scope="session")
def wheel(tmp_path_factory):
    """ftpalg's wheel, built once per run (tests/wheels.py)."""
    from wheels import build_wheel

    return build_wheel(tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("dist"))
