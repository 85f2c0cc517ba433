"""Shared fixtures. Tests marked ``netns`` need root: they build namespace labs with real
kernel NAT, real FTP servers and clients. They are skipped, loudly, without root."""

from __future__ import annotations

import os
import re
import subprocess

import pytest
from hypothesis import settings

# Shared CI machines are slow and noisy: property tests are bounded by example counts,
# not by per-example deadlines.
settings.register_profile("ftpalg", deadline=None)
settings.load_profile("ftpalg")

# labs made by tests and bench/ (fk: test_linux_kernel's three namespaces), named after their pid
STALE = re.compile(r"^(f[abkl]\d+)-(c|gw|s|gw2|i)$")


def pytest_sessionstart(session):
    """Remove labs left by an earlier run that was killed (its pid is gone)."""
    if os.geteuid() != 0:
        return
    from ftpalg.lab.lab import Lab

    try:
        names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    except OSError:
        return
    for prefix in {m.group(1) for n in names if (m := STALE.match(n))}:
        if not os.path.exists(f"/proc/{prefix[2:]}"):
            Lab(prefix).down()


def pytest_collection_modifyitems(config, items):
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root (network namespaces, iptables, NFQUEUE)")
    for item in items:
        if "netns" in item.keywords:
            item.add_marker(skip)


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
