"""Recorded gateway captures of real sessions (vsftpd and pyftpdlib, PORT and EPRT,
several transfers per session), replayed through the core: its output must be what the
real gateway sent, byte for byte. Re-record with ``tests/test_netns_pcap.py`` (root)."""

from pathlib import Path

import pytest

from pcap_replay import replay

DATA = Path(__file__).resolve().parent / "data"
RECORDINGS = sorted(p.name.removesuffix("-inside.pcap") for p in DATA.glob("*-inside.pcap"))


def test_corpus_present():
    assert len(RECORDINGS) >= 2


@pytest.mark.parametrize("name", RECORDINGS)
def test_replay_matches_wire(name):
    n, bad = replay(DATA / f"{name}-inside.pcap", DATA / f"{name}-outside.pcap")
    assert n > 20
    assert bad == []
