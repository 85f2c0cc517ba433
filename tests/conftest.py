"""Shared fixtures. Tests marked ``netns`` need root: they build namespace labs with real
kernel NAT, real FTP servers and clients. They are skipped, loudly, without root."""

from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(config, items):
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root (network namespaces, iptables, NFQUEUE)")
    for item in items:
        if "netns" in item.keywords:
            item.add_marker(skip)
