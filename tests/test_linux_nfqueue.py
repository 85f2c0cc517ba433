"""The NFQUEUE adapter's verdict logic, with a stand-in for netfilterqueue's Packet."""

from alg_helpers import Driven, FakeKernel
from ftpalg.core.alg import Alg
from ftpalg.core.events import PASS, Drop, DropWhy, Replace
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
    def handle(self, raw, now, token=None):
        raise ZeroDivisionError("boom")


def test_fault_passes_packet_unchanged_and_is_counted(caplog):
    alg = Exploding(FakeKernel())
    h = QueueHandler(alg, 1)
    for _ in range(3):
        p = Pkt(b"\x45anything")
        h._on_packet(p)
        assert p.verdict == "accept" and p.new is None
    assert alg.counters["faults"] == 3
    assert caplog.text.count("ZeroDivisionError") >= 1
    assert caplog.text.count("passed unchanged") == 1  # logged once, counted always


def test_verdicts_follow_the_core():
    alg = Driven(FakeKernel())
    h = QueueHandler(alg, 1)
    alg.handle = lambda raw, now, token=None: PASS  # type: ignore[method-assign]
    p = Pkt(b"x")
    h._on_packet(p)
    assert (p.verdict, p.new) == ("accept", None)
    alg.handle = lambda raw, now, token=None: Drop(DropWhy.DUPLICATE)  # type: ignore[method-assign]
    p = Pkt(b"x")
    h._on_packet(p)
    assert p.verdict == "drop"
    alg.handle = lambda raw, now, token=None: Replace(b"new")  # type: ignore[method-assign]
    p = Pkt(b"x")
    h._on_packet(p)
    assert (p.verdict, p.new) == ("accept", b"new")


def test_held_packets_are_retained_and_get_their_verdict_in_order():
    """A packet the core holds is retained; when the rest of its line comes, the held one
    gets its verdict before the packet that completed it."""
    from alg_helpers import Conn, Driven, FakeKernel

    nat = FakeKernel()
    alg = Driven(nat)
    conn = Conn(alg, nat)  # handshake and mapping through the core directly
    h = QueueHandler(alg, 1)
    order = []

    class Q(Pkt):
        def __init__(self, payload, name):
            super().__init__(payload)
            self.name, self.retained = name, False

        def retain(self):
            self.retained = True

        def accept(self):
            order.append(self.name)

        def drop(self):
            order.append(self.name + " dropped")

    from scapy.layers.inet import IP, TCP

    def raw(seq, data):
        return bytes(IP(src="10.0.0.2", dst="203.0.113.2") / TCP(sport=40000, dport=21, seq=seq, ack=conn.c_rcv,
                                                                  flags="PA") / data)

    a = Q(raw(conn.cseq, b"PORT 10,0,0,"), "first")
    h._on_packet(a)
    assert a.retained and order == []
    b = Q(raw(conn.cseq + 12, b"2,195,80\r\n"), "second")
    h._on_packet(b)
    assert order == ["first", "second"] and a.new is not None and b.new is not None


def test_verdicts_and_latency_are_counted_when_asked():
    class Sink:
        def __init__(self):
            self.seen = []

        def observe(self, ns):
            self.seen.append(ns)

    alg = Driven(FakeKernel())
    sink, verdicts = Sink(), {}
    h = QueueHandler(alg, 1, sink, verdicts)
    for out in (PASS, Drop(DropWhy.DUPLICATE), Replace(b"new"), PASS):
        alg.handle = lambda raw, now, token=None, out=out: out  # type: ignore[method-assign]
        h._on_packet(Pkt(b"x"))
    assert verdicts == {"accepted": 2, "dropped": 1, "rewritten": 1}
    assert len(sink.seen) == 4 and all(ns >= 0 for ns in sink.seen)
