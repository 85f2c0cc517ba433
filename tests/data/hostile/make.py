"""Generate the hostile pcap corpus of ``tests/test_hostile.py``: ``python tests/data/hostile/make.py``.

Each pcap holds one FTP control connection as the gateway's hook sees it (the core's input,
in order): client packets with the client's addresses (client -> the address it dials),
server packets with the server's (server -> the client's public address). The NAT mapping is
read back from them: the first client packet gives the original tuple, the first server
packet the reply tuple. Acks are in each peer's own numbering and ignore the length changes
of rewrites (the core does not use them to decide anything).

Deterministic: fixed ISNs, addresses and timestamps, so a run writes the same bytes (the
test regenerates them and compares). ``CORPUS`` also says what replaying each must give:
the pinholes opened, as (peer, public, public_port, inside, inside_port); and, for an escape
the core still has, why it fails today (``xfail``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6
from scapy.utils import wrpcap

HERE = Path(__file__).resolve().parent
NAT = dict(client=("10.0.0.2", 40000), server=("203.0.113.2", 21), dest=("203.0.113.2", 21),
           public=("203.0.113.1", 61000))
DNAT = dict(client=("203.0.113.100", 40000), server=("10.1.0.2", 21), dest=("198.51.100.2", 21),
            public=("203.0.113.100", 40000))


class Talk:
    def __init__(self, client, server, dest, public, cisn=1000, sisn=5000, t0=1_700_000_000.0):
        self.client, self.server, self.dest, self.public = client, server, dest, public
        self.cseq, self.sseq, self.t = cisn, sisn, t0
        self.pkts = []
        self.c(b"", "S")
        self.s(b"", "SA")
        self.c(b"", "A")

    def _ip(self, src, dst):
        return IPv6(src=src, dst=dst) if ":" in src else IP(src=src, dst=dst, id=1, flags="DF")

    def c(self, payload: bytes, flags: str = "PA", rel: int = 0) -> Talk:
        ack = self.sseq if "A" in flags else 0
        p = self._ip(self.client[0], self.dest[0]) / TCP(sport=self.client[1], dport=self.dest[1],
                                                         seq=(self.cseq + rel) & 0xFFFFFFFF, ack=ack, flags=flags,
                                                         window=64240) / payload
        if rel == 0:
            self.cseq += len(payload) + (1 if "S" in flags or "F" in flags else 0)
        return self._add(p)

    def s(self, payload: bytes, flags: str = "PA", rel: int = 0) -> Talk:
        ack = self.cseq if "A" in flags else 0
        p = self._ip(self.server[0], self.public[0]) / TCP(sport=self.server[1], dport=self.public[1],
                                                           seq=(self.sseq + rel) & 0xFFFFFFFF, ack=ack, flags=flags,
                                                           window=64240) / payload
        if rel == 0:
            self.sseq += len(payload) + (1 if "S" in flags or "F" in flags else 0)
        return self._add(p)

    def _add(self, p) -> Talk:
        self.t += 0.01
        p.time = round(self.t, 2)
        self.pkts.append(p)
        return self

    def login(self) -> Talk:
        return self.s(b"220 hi\r\n").c(b"USER anonymous\r\n").s(b"331 ok\r\n").c(b"PASS x\r\n").s(b"230 in\r\n")


@dataclass(frozen=True)
class Entry:
    name: str
    desc: str
    build: object  # () -> Talk
    reason: str | None  # the counter an attack is booked under (None: nothing to book)
    pinholes: tuple = ()  # opened while replaying: (peer, public, public_port, inside, inside_port)
    xfail: str | None = None


def _bounce():
    return (Talk(**NAT).login().c(b"PORT 198,51,100,7,0,25\r\n").s(b"200 ok\r\n")
            .c(b"EPRT |1|198.51.100.7|25|\r\n").s(b"200 ok\r\n").c(b"LPRT 4,4,10,0,0,3,2,195,80\r\n")
            .s(b"200 ok\r\n").c(b"PORT 203,0,113,1,195,80\r\n").s(b"200 ok\r\n"))


def _own_service():
    return (Talk(**NAT).login().c(b"PORT 10,0,0,2,0,22\r\n").s(b"200 ok\r\n").c(b"EPRT |1|10.0.0.2|25|\r\n")
            .s(b"200 ok\r\n").c(b"PORT 10,0,0,2,3,255\r\n").s(b"200 ok\r\n"))


def _slipstream():
    return (Talk(**NAT).login().c(b"HELP " + b"A" * 1400).c(b"PORT 10,0,0,2,195,80\r\n").s(b"214 help\r\n")
            .c(b"NOOP aaaa PORT 10,0,0,2,195,81\r\n").s(b"200 ok\r\n").c(b"NOOP\x00PORT 10,0,0,2,195,82\r\n")
            .s(b"200 ok\r\n").c(b"NOOP P").c(b"ORT 10,0,0,2,195,83\r\n").s(b"200 ok\r\n"))


def _firewall_bypass():
    return (Talk(**DNAT).login().s(b"227 Entering Passive Mode (10,1,0,2,12,234)\r\n").c(b"SYST\r\n")
            .s(b"227 Entering Passive Mode (10,1,0,2,12,234)\r\n").c(b"227 Entering Passive Mode (10,1,0,2,0,22)\r\n")
            .s(b"500 what\r\n").c(b"EPSV\r\n").s(b"227 Entering Passive Mode (10,1,0,2,12,234)\r\n"))


def _passive_bad_targets():
    return (Talk(**DNAT).login().c(b"PASV\r\n").s(b"227 Entering Passive Mode (10,1,0,9,195,149)\r\n")
            .c(b"EPSV\r\n").s(b"229 Entering Extended Passive Mode (|||22|)\r\n")
            .c(b"LPSV\r\n").s(b"228 Entering Long Passive Mode (4,4,10,1,0,2,2,0,22)\r\n")
            .c(b"PASV\r\n").s(b"227 Entering Passive Mode (127,0,0,1,195,149)\r\n"))


def _ftps():
    return (Talk(**NAT).login().c(b"AUTH TLS\r\n").s(b"234 AUTH TLS ok\r\n")
            .c(b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\nPORT 10,0,0,2,195,80\r\n")
            .s(b"\x16\x03\x03\x00\x5a\x02\r\n227 Entering Passive Mode (203,0,113,2,195,149)\r\n")
            .c(b"PORT 10,0,0,2,195,81\r\n"))


def _malformed():
    return (Talk(**NAT).login().c(b"PORT 10,0,0,2,256,1\r\n").s(b"501 no\r\n").c(b"PORT 10,0,0,2,0,0\r\n")
            .s(b"501 no\r\n").c(b"EPRT |2|::ffff:10.0.0.2|50000|\r\n").s(b"522 no\r\n")
            .c(b"EPRT |1|10.0.0.2|65536|\r\n").s(b"501 no\r\n").c(b"PORT 10,0,0,2,195,80\x00\r\n").s(b"501 no\r\n")
            .c(b"PORT " + b"9" * 5000 + b"\r\n").s(b"501 no\r\n"))


def _syn_mid_stream():
    t = Talk(**NAT).login().c(b"NOOP xx")
    t.c(b"", "S", rel=-1)
    return t.c(b"PORT 10,0,0,2,195,80\r\n").s(b"200 ok\r\n")


def _control_port():
    return (Talk(**NAT).login().c(b"TYPE I\r\n").s(b"200 ok\r\n").c(b"PORT 10,0,0,2,195,80\r\n")
            .s(b"200 PORT ok\r\n").c(b"RETR f\r\n").s(b"150 go\r\n").s(b"226 done\r\n").c(b"QUIT\r\n")
            .s(b"221 bye\r\n"))


def _control_pasv():
    return (Talk(**DNAT).login().c(b"PASV\r\n").s(b"227 Entering Passive Mode (10,1,0,2,195,149).\r\n")
            .c(b"RETR f\r\n").s(b"150 go\r\n").s(b"226 done\r\n"))


CORPUS = [
    Entry("bounce", "FTP bounce (RFC 2577, CVE-1999-0017): PORT/EPRT/LPRT naming a third host, the gateway",
          _bounce, "refused"),
    Entry("own-service-port", "PORT/EPRT naming the client's own port 22/25/1023", _own_service, "refused"),
    Entry("slipstream", "NAT slipstreaming (Kamkar 2020): PORT at a segment start mid-line, inside a line, after "
          "a NUL, after a partial verb", _slipstream, None),
    Entry("firewall-bypass", "nmap firewall-bypass.nse: unsolicited 227, 227 answering SYST, client-sent 227, 227 "
          "answering EPSV", _firewall_bypass, "unsolicited"),
    Entry("passive-bad-targets", "227/229/228 naming a third inside host, port 22, loopback",
          _passive_bad_targets, "refused"),
    Entry("ftps", "AUTH TLS + 234, then PORT and 227 text inside the TLS stream", _ftps, "encrypted"),
    Entry("malformed", "numbers > 255, port 0, family mismatch, port 65536, NUL, 5 KiB argument",
          _malformed, "malformed"),
    Entry("syn-mid-stream", "a SYN with seq next-1 mid-line tries to reset the line start for the PORT after it",
          _syn_mid_stream, "syn_mid_stream"),
    Entry("control-port", "control: a normal active-mode session (one pinhole)", _control_port, None,
          pinholes=(("203.0.113.2", "203.0.113.1", 50000, "10.0.0.2", 50000),)),
    Entry("control-pasv-dnat", "control: a normal passive-mode session to a server behind DNAT (one pinhole)",
          _control_pasv, None, pinholes=(("203.0.113.100", "198.51.100.2", 50069, "10.1.0.2", 50069),)),
]


def write(outdir: Path = HERE) -> list[Path]:
    out = []
    for e in CORPUS:
        path = outdir / f"{e.name}.pcap"
        wrpcap(str(path), e.build().pkts)
        out.append(path)
    return out


if __name__ == "__main__":
    for p in write(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE):
        print(p)
