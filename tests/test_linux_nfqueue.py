"""The NFQUEUE adapter's verdict logic, with a stand-in for netfilterqueue's Packet."""

from alg_helpers import FakeNat, FakePinholes
from ftpalg.core.table import Alg
from ftpalg.linux.nfqueue import QueueHandler


class Pkt:
    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.verdict = ""
        self.new = None

    def get_payload(self) -> bytes:
        return self.payload

    def set_payload(self, b: bytes) -> None:
        self.new = b

    def accept(self) -> None:
        self.verdict += "accept"

    def drop(self) -> None:
        self.verdict += "drop"


class Exploding(Alg):
    def handle(self, raw, now):
        raise ZeroDivisionError("boom")


def test_fault_passes_packet_unchanged_and_is_counted(caplog):
    alg = Exploding(FakeNat(), FakePinholes())
    h = QueueHandler(alg, 1)
    for _ in range(3):
        p = Pkt(b"\x45anything")
        h._on_packet(p)
        assert p.verdict == "accept" and p.new is None
    assert alg.counters["faults"] == 3
    assert caplog.text.count("ZeroDivisionError") >= 1
    assert caplog.text.count("passed unchanged") == 1  # logged once, counted always


def test_verdicts_follow_the_core():
    alg = Alg(FakeNat(), FakePinholes())
    h = QueueHandler(alg, 1)
    alg.handle = lambda raw, now: None  # type: ignore[method-assign]
    p = Pkt(b"x")
    h._on_packet(p)
    assert (p.verdict, p.new) == ("accept", None)
    alg.handle = lambda raw, now: b""  # type: ignore[method-assign]
    p = Pkt(b"x")
    h._on_packet(p)
    assert p.verdict == "drop"
    alg.handle = lambda raw, now: b"new"  # type: ignore[method-assign]
    p = Pkt(b"x")
    h._on_packet(p)
    assert (p.verdict, p.new) == ("accept", b"new")
