"""A scripted TCP conversation through the ALG core: tests read as what goes in and what
must come out. Packets are crafted with scapy (tests only)."""

from __future__ import annotations

import ipaddress
import struct

from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6

from ftpalg.core import packet
from ftpalg.core.accounting import Accounting
from ftpalg.core.addr import FlowKey
from ftpalg.core.alg import Alg
from ftpalg.core.events import HELD, PASS, Drop, Event, Replace
from ftpalg.core.offline import OfflineKernel
from ftpalg.core.seqadj import KernelAdj

MASK = 0xFFFFFFFF


class FakeKernel(OfflineKernel):
    """The offline kernel, with the other half of seqadj: ``kernel`` applies the recorded
    corrections to a packet leaving the hook, like nf_ct_seq_adjust() does at confirm time.
    Written with ``struct`` here, apart from ftpalg's codec: an oracle of its own."""

    def kernel(self, raw: bytes, key: FlowKey, direction: int) -> bytes:
        a = self.adj.get(key)
        if a is None or not (a[0].active or a[1].active):
            return raw
        return seqadj_applied(raw, a[direction], a[1 - direction])


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def _after(a: int, b: int) -> bool:
    """a is after b in 32-bit serial arithmetic (the kernel's after())."""
    return 0 < (a - b) & MASK < 0x80000000


def seqadj_applied(raw: bytes, this: KernelAdj, other: KernelAdj) -> bytes:
    """``raw`` as the kernel sends it after seqadj: seq moved by this direction's correction,
    ack and SACK edges moved back by the other's (net/netfilter/nf_conntrack_seqadj.c:
    nf_ct_seq_adjust and nf_ct_sack_block_adjust, written again here)."""

    def seq_off(seq: int) -> int:
        return this.after if _after(seq, this.pos) else this.before

    def ack_off(ack: int) -> int:
        return other.after if _after((ack - other.before) & MASK, other.pos) else other.before

    b = bytearray(raw)
    if b[0] >> 4 == 4:
        ihl, total = (b[0] & 15) * 4, struct.unpack_from("!H", b, 2)[0]
        src, dst = bytes(b[12:16]), bytes(b[16:20])
    else:
        ihl, total = 40, 40 + struct.unpack_from("!H", b, 4)[0]
        src, dst = bytes(b[8:24]), bytes(b[24:40])
    t = ihl
    seq, ack = struct.unpack_from("!II", b, t + 4)
    thl, flags = (b[t + 12] >> 4) * 4, b[t + 13]
    struct.pack_into("!I", b, t + 4, (seq + seq_off(seq)) & MASK)
    if flags & 0x10:
        struct.pack_into("!I", b, t + 8, (ack - ack_off(ack)) & MASK)
        i = t + 20
        while i < t + thl:  # SACK blocks (kind 5): both edges, like acks
            kind = b[i]
            if kind == 0:
                break
            if kind == 1:
                i += 1
                continue
            length = b[i + 1]
            if kind == 5:
                for j in range(i + 2, i + length, 4):
                    edge = struct.unpack_from("!I", b, j)[0]
                    struct.pack_into("!I", b, j, (edge - ack_off(edge)) & MASK)
            i += max(length, 2)
    seg = bytes(b[t:total])
    seg = seg[:16] + b"\0\0" + seg[18:]
    if len(src) == 4:
        pseudo = src + dst + struct.pack("!BBH", 0, 6, len(seg))
    else:
        pseudo = src + dst + struct.pack("!IxxxB", len(seg), 6)
    struct.pack_into("!H", b, t + 16, _csum(pseudo + seg))
    return bytes(b)


class Driven(Alg):
    """The core as a caller drives it: after each call, what it decided is drained into
    an ``Accounting`` (the counters tests read) and kept in ``seen``."""

    def __init__(self, kernel: OfflineKernel, *args, on_transfer=None, audit=None, **kw) -> None:
        super().__init__(kernel, *args, audit=on_transfer is not None if audit is None else audit, **kw)
        self.accounting = Accounting(self.counters, on_transfer)
        self.seen: list[Event] = []

    def _account(self) -> None:
        if self.events:
            evs = self.drain()
            self.seen += evs
            self.accounting.consume(evs)

    def handle(self, raw, now, token=None):
        out = super().handle(raw, now, token)
        self._account()
        return out

    def take_released(self):
        out = super().take_released()
        self._account()
        return out

    def on_timer(self, now):
        super().on_timer(now)
        self._account()

    def expire_held(self, now):
        super().expire_held(now)
        self._account()

    def tick(self, now):
        super().tick(now)
        self._account()

    def release_all(self):
        super().release_all()
        self._account()

    def shutdown(self):
        super().shutdown()
        self._account()


def as_bytes(v) -> bytes | None:
    """A verdict in the old shape: None unchanged, b'' dropped, the packet, or HELD."""
    if v is PASS:
        return None
    if isinstance(v, Drop):
        return b""
    if isinstance(v, Replace):
        return v.packet
    assert v is HELD, v
    return v


def packed(a: str) -> bytes:
    return ipaddress.ip_address(a).packed


class Conn:
    """One control connection: client (inside) -> gateway hook -> server.

    ``c`` sends a client segment at the hook and returns what the ALG lets through (decoded);
    ``s`` sends a server segment (addressed to the public address, as the hook sees it).
    The peers keep their own numbering: acks they send are for what they received.
    """

    def __init__(self, alg: Alg, nat: FakeKernel, client=("10.0.0.2", 40000), server=("203.0.113.2", 21),
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
        out = as_bytes(self.alg.handle(raw, self.now, token=(seq, payload)))
        d = 0 if src == self.client else 1
        # held packets the core let go meanwhile: what the peer got of them, in order
        self.released = [(tok, None if o == b"" else packet.decode(self.nat.kernel(o or tok_raw, self.key, d)))
                         for tok, o, tok_raw in ((t, as_bytes(o), self.sent[t]) for t, o in self.alg.take_released())]
        self.last_in = raw
        self.held_last = out is HELD
        if out is HELD:
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


# ---- hostile-input corpus and fuzzing (tests/test_hostile.py, tests/test_fuzz.py) ----------
_FLAG_BITS = {"F": 0x01, "S": 0x02, "R": 0x04, "P": 0x08, "A": 0x10, "U": 0x20, "E": 0x40, "C": 0x80}


def raw_tcp(src: str, dst: str, sport: int, dport: int, seq: int, ack: int, flags: str | int, payload: bytes = b"",
            options: bytes = b"", ip_options: bytes = b"", ttl: int = 64) -> bytes:
    """An IPv4 or IPv6 TCP packet with valid checksums, built with struct (no scapy: fast
    enough for fuzzing). ``options``/``ip_options`` are raw bytes, padded to 4 with EOL."""
    import struct

    if isinstance(flags, str):
        flags = sum(_FLAG_BITS[f] for f in flags)
    options += b"\0" * (-len(options) % 4)
    thl = 20 + len(options)
    tcp = bytearray(struct.pack("!HHIIBBHHH", sport, dport, seq & MASK, ack & MASK, (thl // 4) << 4, flags & 0xFF,
                                65535, 0, 0) + options + payload)
    s, d = packed(src), packed(dst)
    if len(s) == 4:
        ip_options += b"\0" * (-len(ip_options) % 4)
        ihl = 20 + len(ip_options)
        ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x40 | ihl // 4, 0, ihl + len(tcp), 0x1234, 0x4000, ttl, 6, 0, s, d)
                       + ip_options)
        struct.pack_into("!H", ip, 10, packet.checksum(ip))
        pseudo = s + d + struct.pack("!BBH", 0, 6, len(tcp))
    else:
        ip = bytearray(struct.pack("!IHBB16s16s", 0x60000000, len(tcp), 6, ttl, s, d))
        pseudo = s + d + struct.pack("!IxxxB", len(tcp), 6)
    struct.pack_into("!H", tcp, 16, packet.checksum(pseudo + bytes(tcp)))
    return bytes(ip + tcp)


def checksums_valid(raw: bytes) -> bool:
    """Whether ``raw`` decodes with the core's codec, is not truncated, and its IPv4 header
    checksum and TCP checksum (over the pseudo-header) verify."""
    import struct

    try:
        seg = packet.decode(raw)
    except packet.DecodeError:
        return False
    if seg.truncated:
        return False
    tcp = raw[seg.tcp_off : seg.total_len]
    if seg.version == 4:
        if packet.checksum(raw[: seg.ip_hlen]) != 0:
            return False
        pseudo = seg.src + seg.dst + struct.pack("!BBH", 0, 6, len(tcp))
    else:
        pseudo = seg.src + seg.dst + struct.pack("!IxxxB", len(tcp), 6)
    return packet.checksum(pseudo + tcp) == 0


class FastConn(Conn):
    """``Conn`` whose packets are built by ``raw_tcp`` instead of scapy (same behaviour,
    ~20x faster: for property tests that send thousands of segments). ``tcp_options`` are
    added to every segment; every packet the core hands back is checked well formed."""

    tcp_options = b""
    handled = 0  # calls of Alg.handle made through this connection

    def _send(self, src, dst, seq, ack, payload, flags, options=()):
        raw = raw_tcp(src[0], dst[0], src[1], dst[1], seq, ack, flags, payload, bytes(options) or self.tcp_options)
        if src == self.client and flags == "S":
            self.nat.adj.pop(self.key, None)
        self.sent[(seq, payload)] = raw
        out = as_bytes(self.alg.handle(raw, self.now, token=(seq, payload)))
        self.handled += 1
        d = 0 if src == self.client else 1
        released = [(t, as_bytes(o)) for t, o in self.alg.take_released()]
        for _, o in released:
            assert o is None or o == b"" or checksums_valid(o), o
        self.released = [(tok, None if o == b"" else packet.decode(self.nat.kernel(o or self.sent[tok], self.key, d)))
                         for tok, o in released]
        self.last_in = raw
        self.held_last = out is HELD
        if out is HELD:
            self.last_raw = self.last_core = b""
            return None
        assert out is None or out == b"" or checksums_valid(out), out
        self.last_core = raw if out is None else out
        if out == b"":
            self.last_raw = out
            return None
        self.last_raw = self.nat.kernel(self.last_core, self.key, d)
        return packet.decode(self.last_raw)


def pinhole_violations(alg: Alg, holes: FakeKernel) -> list[str]:
    """What is wrong with the live pinholes of ``alg`` against the policy: each names the
    real peer of its control connection and the address the policy allows, a port at least
    ``min_port``, one per control connection; and the books (promised, per client, counters)
    agree with the kernel's. The control connection's addresses come from the kernel's
    table (what the test told conntrack), not from the core's own idea of the mapping."""
    from collections import Counter

    def text(b: bytes) -> str:
        return str(ipaddress.ip_address(b))

    bad: list[str] = []
    per_master: Counter = Counter()
    tracked = {f.key for f, d in alg.flows.values() if d == 0}
    for ph in holes.live.values():
        per_master[ph.master] += 1
        reply = holes.table.get(ph.master)
        if ph.master not in tracked or reply is None:  # forgotten: its pinhole must have been closed
            bad.append(f"pinhole {ph.describe()} outlives its control connection")
            continue
        client, public = text(ph.master[0]), text(ph.master[2])
        server, client_seen = text(reply[0]), text(reply[2])
        if ph.inside_port < alg.limits.min_port:
            bad.append(f"pinhole {ph.describe()} to a port below {alg.limits.min_port}")
        if ph.active:  # PORT/EPRT/LPRT: from the server, to the client itself
            ok = (ph.peer, ph.inside, ph.public) == (server, client, client_seen)
        else:  # 227/228/229: from the client, to the server itself
            ok = (ph.peer, ph.inside, ph.public) == (client, server, public)
        if not ok:
            bad.append(f"pinhole {ph.describe()} does not match the control connection "
                       f"{client}>{public} / {server}>{client_seen}")
    bad += [f"{n} pinholes for one control connection {k}" for k, n in per_master.items() if n > 1]
    c = alg.counters
    if c["pinholes_opened"] - c["pinholes_closed"] != len(holes.live):
        bad.append(f"opened {c['pinholes_opened']} - closed {c['pinholes_closed']} != live {len(holes.live)}")
    if len(alg.promised) != len(holes.live) or sum(alg.per_client.values()) != len(holes.live):
        bad.append(f"books disagree: promised {len(alg.promised)}, per client {dict(alg.per_client)}, "
                   f"live {len(holes.live)}")
    if any(n <= 0 for n in alg.per_client.values()):
        bad.append(f"per-client count not positive: {dict(alg.per_client)}")
    if alg.tracked != sum(1 for _, d in alg.flows.values() if d == 0):
        bad.append(f"tracked {alg.tracked} != flows {sum(1 for _, d in alg.flows.values() if d == 0)}")
    return bad
