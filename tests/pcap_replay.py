"""Replay a gateway capture through the ALG core and compare, byte for byte, with what the
real gateway (kernel NAT + ftpalg) sent.

A recording is two pcaps of the control port taken on the gateway while ftpalg ran:
``inside`` (the client-side interface) and ``outside`` (the server-side interface), whichever
side is behind NAT. The core's input is what arrived: client packets on the client side,
server packets on the server side. Its output must equal what left the other interface once
the kernel's NAT is undone (addresses, ports, TTL; checksums recomputed by scapy)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from scapy.layers.inet import IP, TCP
from scapy.utils import rdpcap

from alg_helpers import Driven, FakeKernel, as_bytes


def _norm(raw: bytes, src: tuple[str, int] | None = None, dst: tuple[str, int] | None = None,
          ttl: int = 0) -> bytes:
    """``raw`` with addresses/ports replaced, TTL raised by ``ttl`` and checksums recomputed."""
    q = IP(raw)
    if src:
        q.src, q[TCP].sport = src
    if dst:
        q.dst, q[TCP].dport = dst
    q.ttl += ttl
    del q.chksum, q[TCP].chksum
    return bytes(q)


def _kind(p) -> bool:
    """Whether the kernel queued this packet to ftpalg (payload, SYN, FIN or RST)."""
    return bool(bytes(p[TCP].payload)) or bool(int(p[TCP].flags) & 0x07)


def _paired(ins: list, outs: list, conn) -> list:
    """``outs`` reordered so that outs[i] is what left for ins[i]."""
    queues: dict = {}
    for p in outs:
        queues.setdefault((conn(p), _kind(p)), []).append(p)
    return [queues[(conn(p), _kind(p))].pop(0) for p in ins]


def replay(inside: Path, outside: Path, control_port: int = 21) -> tuple[int, list[str]]:
    """Return (packets compared, mismatch descriptions)."""
    ins = [p for p in rdpcap(str(inside)) if TCP in p]
    outs = [p for p in rdpcap(str(outside)) if TCP in p]
    c2s_in = [p for p in ins if p[TCP].dport == control_port]
    s2c_out = [p for p in ins if p[TCP].sport == control_port]  # left towards the client
    c2s_out = [p for p in outs if p[TCP].dport == control_port]  # left towards the server
    s2c_in = [p for p in outs if p[TCP].sport == control_port]
    assert len(c2s_in) == len(c2s_out) and len(s2c_in) == len(s2c_out), "a packet was dropped or added"
    # Pure ACKs are not queued, so they overtake queued segments: pair what arrived with
    # what left per connection (the client's port: SNAT and DNAT here keep it) and per kind.
    c2s_out = _paired(c2s_in, c2s_out, lambda p: p[TCP].sport)
    s2c_out = _paired(s2c_in, s2c_out, lambda p: p[TCP].dport)
    nat = FakeKernel()
    for a, b in zip(c2s_in, c2s_out, strict=True):  # NAT mapping, as conntrack would report it
        key = (ipaddress.ip_address(a[IP].src).packed, a[TCP].sport, ipaddress.ip_address(a[IP].dst).packed,
               a[TCP].dport)
        nat.table[key] = (ipaddress.ip_address(b[IP].dst).packed, b[TCP].dport,
                          ipaddress.ip_address(b[IP].src).packed, b[TCP].sport)
    originals = {reply: orig for orig, reply in nat.table.items()}
    alg = Driven(nat)
    events = sorted([(float(p.time), 0, i) for i, p in enumerate(c2s_in)]
                    + [(float(p.time), 1, i) for i, p in enumerate(s2c_in)])
    bad = []
    for t, d, i in events:
        src = c2s_in[i] if d == 0 else s2c_in[i]
        raw = bytes(src[IP])
        got = as_bytes(alg.handle(raw, t))
        # then the kernel's sequence adjustment, keyed by the connection's original tuple
        pkt_key = (ipaddress.ip_address(src[IP].src).packed, src[TCP].sport,
                   ipaddress.ip_address(src[IP].dst).packed, src[TCP].dport)
        key = pkt_key if d == 0 else originals[pkt_key]
        got = _norm(nat.kernel(raw if got is None else got, key, d))  # checksums may be partial (offload)
        sent = c2s_out[i] if d == 0 else s2c_out[i]
        # undo SNAT and DNAT alike: the core works on packets as they arrived
        want = _norm(bytes(sent[IP]), src=(src[IP].src, src[TCP].sport), dst=(src[IP].dst, src[TCP].dport), ttl=1)
        if got != want:
            bad.append(f"{'c2s' if d == 0 else 's2c'} #{i}: core {IP(got).summary()} {bytes(IP(got)[TCP].payload)!r}"
                       f" != wire {IP(want).summary()} {bytes(IP(want)[TCP].payload)!r}")
    return len(events), bad
