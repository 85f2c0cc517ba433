"""A scripted TCP conversation through the ALG core: tests read as what goes in and what
must come out. Packets are crafted with scapy (tests only)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6

from ftpalg.core import packet
from ftpalg.core.seqadj import KernelAdj
from ftpalg.core.table import Alg, FlowKey, Held, Pinhole

MASK = 0xFFFFFFFF


class FakeNat:
    """Conntrack as the core sees it, and the kernel's sequence adjustment: ``seq_adjust``
    records corrections like nf_ct_seqadj_set(); ``kernel`` applies them to a packet leaving
    the hook like nf_ct_seq_adjust() does at confirm time."""

    def __init__(self) -> None:
        self.table: dict[FlowKey, FlowKey] = {}
        self.adj: dict[FlowKey, list[KernelAdj]] = {}
        self.fail_adjust = False

    def reply_tuple(self, key: FlowKey) -> FlowKey | None:
        return self.table.get(key)

    def seq_adjust(self, key: FlowKey, direction: int, seq: int, delta: int) -> KernelAdj:
        if self.fail_adjust:
            raise OSError(95, "connection has no sequence-adjustment extension")
        a = self.adj.setdefault(key, [KernelAdj(), KernelAdj()])
        a[direction] = a[direction].add(seq, delta)
        return a[direction]

    def kernel(self, raw: bytes, key: FlowKey, direction: int) -> bytes:
        a = self.adj.get(key)
        if a is None or not (a[0].active or a[1].active):
            return raw
        seg = packet.decode(raw)
        this, other = a[direction], a[1 - direction]
        seq = (seg.seq + this.seq_offset(seg.seq)) & MASK
        if not seg.flags & packet.TcpFlags.ACK:
            return packet.encode(seg, seg.payload, seq, seg.ack)
        return packet.encode(seg, seg.payload, seq, (seg.ack - other.ack_offset(seg.ack)) & MASK,
                             lambda x: (x - other.ack_offset(x)) & MASK)


@dataclass
class FakePinholes:
    live: dict[int, Pinhole] = field(default_factory=dict)
    log: list[tuple[str, int]] = field(default_factory=list)
    fail: bool = False

    def open(self, ph: Pinhole) -> None:
        if self.fail:
            raise RuntimeError("iptables-restore: simulated failure")
        assert ph.id not in self.live
        self.live[ph.id] = ph
        self.log.append(("open", ph.id))

    def close(self, ph: Pinhole) -> None:
        del self.live[ph.id]
        self.log.append(("close", ph.id))


def packed(a: str) -> bytes:
    return ipaddress.ip_address(a).packed


class Conn:
    """One control connection: client (inside) -> gateway hook -> server.

    ``c`` sends a client segment at the hook and returns what the ALG lets through (decoded);
    ``s`` sends a server segment (addressed to the public address, as the hook sees it).
    The peers keep their own numbering: acks they send are for what they received.
    """

    def __init__(self, alg: Alg, nat: FakeNat, client=("10.0.0.2", 40000), server=("203.0.113.2", 21),
                 public=("203.0.113.1", 61000), cisn=1000, sisn=5000, handshake=True, dest=None) -> None:
        """``dest``: where the client connects (default: the server itself; a public address
        that the gateway DNATs to ``server`` otherwise); ``public``: the client's address
        and port as the server sees them (after any SNAT)."""
        self.alg, self.client, self.server, self.public, self.nat = alg, client, server, public, nat
        self.dest = dest or server
        self.sent: dict = {}  # token -> raw packet, for held packets coming back
        self.released: list = []
        self.key = (packed(client[0]), client[1], packed(self.dest[0]), self.dest[1])
        self.cseq, self.sseq = cisn & MASK, sisn & MASK  # next seq each peer sends (own numbering)
        self.c_rcv = self.s_rcv = 0  # next seq each peer expects to receive (sender's wire numbering)
        nat.table[(packed(client[0]), client[1], packed(self.dest[0]), self.dest[1])] = (
            packed(server[0]), server[1], packed(public[0]), public[1])
        self.now = 0.0
        if handshake:
            self.c(b"", "S")
            self.s(b"", "SA")
            self.c(b"", "A")

    def _send(self, src, dst, seq, ack, payload, flags, options=()):
        """One packet through the hook (the core), then the kernel's seq adjustment: what
        the peer receives."""
        ip = IPv6(src=src[0], dst=dst[0]) if ":" in src[0] else IP(src=src[0], dst=dst[0])
        raw = bytes(ip / TCP(sport=src[1], dport=dst[1], seq=seq, ack=ack, flags=flags,
                                                     options=list(options)) / payload)
        if src == self.client and flags == "S":  # conntrack makes a new entry for a new SYN
            self.nat.adj.pop(self.key, None)
        self.sent[(seq, payload)] = raw
        out = self.alg.handle(raw, self.now, token=(seq, payload))
        d = 0 if src == self.client else 1
        # held packets the core let go meanwhile: what the peer got of them, in order
        self.released = [(tok, None if o == b"" else packet.decode(self.nat.kernel(o or tok_raw, self.key, d)))
                         for tok, o, tok_raw in ((t, o, self.sent[t]) for t, o in self.alg.take_released())]
        self.last_in = raw
        self.held_last = isinstance(out, Held)
        if isinstance(out, Held):
            self.last_raw = b""
            return None
        self.last_core = raw if out is None else out
        if out == b"":
            self.last_raw = out
            return None
        self.last_raw = self.nat.kernel(self.last_core, self.key, d)
        return packet.decode(self.last_raw)

    def c(self, payload: bytes, flags: str = "PA", seq: int | None = None, options=()):
        s = self.cseq if seq is None else seq
        ack = self.c_rcv if "A" in flags else 0
        seg = self._send(self.client, self.dest, s, ack, payload, flags, options)
        extra = 1 if "S" in flags or "F" in flags else 0
        if seq is None:  # in order: the server now expects what follows
            self.cseq = (self.cseq + len(payload) + extra) & MASK
            if seg is not None:
                self.s_rcv = (seg.seq + len(seg.payload) + extra) & MASK
        return seg

    def s(self, payload: bytes, flags: str = "PA", options=()):
        ack = self.s_rcv if "A" in flags else 0
        if "S" in flags:
            ack = self.cseq  # SYN-ACK acks the client's SYN (no corrections before data)
            self.s_rcv = self.cseq
        seg = self._send(self.server, self.public, self.sseq, ack, payload, flags, options)
        self.sseq = (self.sseq + len(payload) + (1 if "S" in flags or "F" in flags else 0)) & MASK
        if seg is not None:
            self.c_rcv = (seg.seq + len(seg.payload) + (1 if "S" in flags or "F" in flags else 0)) & MASK
        return seg
