"""Selected queueing decides as full queueing does: the same sessions, cut into segments at
random, go once through a core that sees every segment (``gateway.queue = "all"``) and once
through a core that sees only what the kernel's selection rules queue (``"selected"``, the
default: ``ftpalg.linux.rules``); the bytes each peer receives (after the kernel's sequence
adjustment) and the pinholes opened must be the same.

``kernel_selects`` is the selection written again from the rules' text (FTPALG-SELECT), not
taken from the code under test: a segment with payload is queued if its connection carries
the follow label, if it does not end with LF, if the client's carries an address verb in any
case anywhere, or the server's a passive reply code or 234 anywhere.
"""

from __future__ import annotations

import ipaddress
import random

import pytest
from test_fuzz import TOPOLOGIES

from alg_helpers import Conn, Driven, FakeKernel, FastConn
from ftpalg.core import packet
from ftpalg.core.events import PASS, Resynced
from ftpalg.core.nat64 import Nat64
from ftpalg.core.policy import Limits
from ftpalg.core.seqadj import MASK
from ftpalg.linux import rules

SESSIONS = 150  # per topology
VERBS = (b"PORT", b"EPRT", b"LPRT", b"PASV", b"EPSV", b"LPSV", b"AUTH", b"ALGS")
CODES = (b"227", b"228", b"229", b"234")


def kernel_selects(payload: bytes, from_client: bool, followed: bool) -> bool:
    if not payload:
        return False
    if followed or not payload.endswith(b"\n"):
        return True
    if from_client:
        return any(v in payload.upper() for v in VERBS)
    return any(c in payload for c in CODES)


def test_the_selection_here_is_the_rules_selection():
    """The words and codes above are the rules' own (the rules' text is what the kernel runs)."""
    assert tuple(v.decode() for v in VERBS) == rules.SELECT_VERBS
    assert tuple(c.decode() for c in CODES) == rules.SELECT_REPLIES
    text = rules.iptables_queue_rules([21], 7, selected=True)
    for v in rules.SELECT_VERBS:
        assert f'--ctdir ORIGINAL -m string --algo bm --icase --string "{v}"' in text
    for c in rules.SELECT_REPLIES:
        assert f'--ctdir REPLY -m string --algo bm --string "{c}"' in text
    assert f"-m connlabel --label {rules.FOLLOW_LABEL}" in text and rules.NO_LINE_END_BPF in text
    assert "--tcp-flags FIN FIN -j FTPALG-VERDICT" in text and "--syn" not in text and "RST" not in text


class Selecting:
    """The kernel's queue rules in front of a core: a segment they do not select passes
    unchanged (the kernel's seqadj still applies to it, as FakeKernel.kernel plays it)."""

    def __init__(self, alg: Driven, kernel: FakeKernel, client: str) -> None:
        self.alg, self.kernel, self.client = alg, kernel, client
        self.queued = 0

    def handle(self, raw: bytes, now: float, token: object = None):
        seg = packet.decode(raw)
        key = (seg.src, seg.sport, seg.dst, seg.dport)
        from_client = str(ipaddress.ip_address(seg.src)) == self.client
        followed = any(k in self.kernel.following for k in (key, *self._originals(key)))
        if not kernel_selects(seg.payload, from_client, followed) and not seg.flags & packet.FIN:
            return PASS
        self.queued += 1
        return self.alg.handle(raw, now, token)

    def _originals(self, reply: tuple) -> list[tuple]:
        return [orig for orig, r in self.kernel.table.items() if r == reply]

    def take_released(self):
        return self.alg.take_released()


LINES_C = [b"USER anonymous\r\n", b"PASS x\r\n", b"TYPE I\r\n", b"RETR file.bin\r\n", b"NOOP\r\n", b"CWD /pub\r\n",
           b"LIST\r\n", b"RETR report.txt\r\n", b"STOR up\r\n"]
LINES_S = [b"200 ok\r\n", b"226 Transfer complete.\r\n", b"250 ok\r\n", b"230 Login successful.\r\n",
           b"331 Please specify the password.\r\n", b"550 No such file.\r\n"]  # final replies: one per command


def script(rng: random.Random, topo: str) -> list[tuple[str, bytes]]:
    """A session: ordinary lines, and announcements in both modes, each answered."""
    t = TOPOLOGIES[topo]
    v6 = ":" in t["client"][0]
    out: list[tuple[str, bytes]] = []
    for _ in range(rng.randint(2, 6)):
        port = rng.randint(1024, 65535)
        p1, p2 = divmod(port, 256)
        pre_c = b"".join(rng.choice(LINES_C) for _ in range(rng.randint(0, 2)))
        pre_s = b"".join(rng.choice(LINES_S) for _ in range(len(pre_c.splitlines())))
        if pre_c:
            out += [("c", pre_c), ("s", pre_s)]
        mode = rng.choice(["port", "pasv", "epsv", "eprt", "multi"] if not v6 else ["epsv", "eprt"])
        if mode == "port":
            h = t["client"][0].replace(".", ",").encode()
            out += [("c", b"PORT %s,%d,%d\r\n" % (h, p1, p2)), ("s", b"200 PORT command successful.\r\n")]
        elif mode == "eprt":
            fam, a = (b"2", t["client"][0].encode()) if v6 else (b"1", t["client"][0].encode())
            out += [("c", b"EPRT |%s|%s|%d|\r\n" % (fam, a, port)), ("s", b"200 EPRT command successful.\r\n")]
        elif mode == "epsv":
            reply = b"229 Entering Extended Passive Mode (|||%d|)\r\n" % port
            out += [("c", rng.choice([b"EPSV\r\n", b"epsv\r\n"])), ("s", reply)]
        else:
            h = t["server"][0].replace(".", ",").encode()
            reply = b"227 Entering Passive Mode (%s,%d,%d).\r\n" % (h, p1, p2)
            if mode == "multi":  # the address on a line of its own, between the code's lines
                reply = b"227-Entering Passive Mode\r\n =%s,%d,%d\r\n227 OK\r\n" % (h, p1, p2)
            out += [("c", rng.choice([b"PASV\r\n", b"pasv\r\n"])), ("s", reply)]
        out += [("c", b"RETR f\r\n"), ("s", b"150 go\r\n226 done\r\n")]
    return out


def _cut(rng: random.Random, side: str, data: bytes) -> list[bytes]:
    """``data`` in segments: whole lines grouped at random, and lines that carry or ask for an
    address also cut inside (anywhere, the verb included). Ordinary lines stay whole: a core
    that sees every segment does not put an ordinary line split across segments together (it
    has nothing to rewrite in it), so it would miss a reply that selection never needed."""
    pieces: list[bytes] = []
    for line in data.splitlines(keepends=True):
        carries = any(v in line.upper() for v in VERBS) if side == "c" else line[:3] in CODES or line[:1] == b" "
        if carries and len(line) > 2 and rng.random() < 0.5:
            at = rng.randrange(1, len(line))
            pieces += [line[:at], line[at:]]
        else:
            pieces.append(line)
    out: list[bytes] = []
    for p in pieces:
        if out and out[-1].endswith(b"\n") and rng.random() < 0.3:
            out[-1] += p  # several lines in one segment
        else:
            out.append(p)
    return out


def _run(topo: str, steps: list[tuple[str, list[bytes]]], selected: bool, t: dict | None = None,
         nat64: Nat64 | None = None) -> tuple:
    """The bytes each peer got, the pinholes opened and the segments queued; ``t``: the
    topology itself (default TOPOLOGIES[topo]); ``nat64``: the core's translator."""
    kernel = FakeKernel()
    alg = Driven(kernel, rng=random.Random(7), selected=selected, nat64=nat64)
    t = TOPOLOGIES[topo] if t is None else t
    front = Selecting(alg, kernel, t["client"][0]) if selected else alg
    conn = FastConn(front, kernel, **t)  # type: ignore[arg-type]
    got: dict[str, list[bytes]] = {"c": [], "s": []}
    for side, segs in steps:
        for s in segs:
            seg = conn.c(s) if side == "c" else conn.s(s)
            for _, rel in conn.released:
                if rel is not None:
                    got["s" if side == "c" else "c"].append(rel.payload)
            if seg is not None:
                got["s" if side == "c" else "c"].append(seg.payload)
        conn.now += 0.1
    conn.now += 5
    alg.on_timer(conn.now)
    alg.take_released()
    holes = [(ph.peer, ph.public, ph.public_port, ph.inside, ph.inside_port) for ph in kernel.opened]
    queued = front.queued if isinstance(front, Selecting) else conn.handled
    return b"".join(got["s"]), b"".join(got["c"]), holes, queued


@pytest.mark.parametrize("topo", sorted(TOPOLOGIES))
def test_selected_queueing_gives_the_same_bytes_and_pinholes_as_full_queueing(topo):
    rng = random.Random(20261207)
    total = queued = opened = 0
    for i in range(SESSIONS):
        steps = [(side, _cut(rng, side, data)) for side, data in script(rng, topo)]
        full, sel = _run(topo, steps, False), _run(topo, steps, True)
        assert full[:3] == sel[:3], f"session {i}: {steps!r}"
        total, queued, opened = total + full[3], queued + sel[3], opened + len(full[2])
    assert opened >= SESSIONS * 2  # announcements did open pinholes: the comparison says something
    assert queued < total / 2  # and the selection did leave most segments in the kernel


# ---- what selection hides -------------------------------------------------------------------
PORT = b"PORT 10,0,0,2,195,80\r\n"  # 10.0.0.2:50000
PORT_OUT = b"PORT 203,0,113,1,195,80\r\n"


def test_a_correction_made_elsewhere_meanwhile_is_not_overwritten():
    """Fail-back in a gateway pair, selected mode: this process rewrote a PORT, the other
    gateway carried the session and rewrote one more (the synced kernel correction grew),
    now the session is back. The bytes in between were never queued here, so no gap tells
    that they went by elsewhere: the kernel's correction is read before the next one, found
    not to be this process's own, and the history is dropped; the next PORT lands where the
    server expects it (the kernel's two corrections and its own)."""
    nat = FakeKernel()
    alg = Driven(nat, selected=True)
    front = Selecting(alg, nat, "10.0.0.2")
    conn = Conn(front, nat)  # type: ignore[arg-type]
    for line in (b"USER anonymous\r\n", b"PASS x\r\n"):
        conn.c(line)
        conn.s(b"230 ok\r\n")
    grow = len(PORT_OUT) - len(PORT)
    seg = conn.c(PORT)
    assert seg.payload == PORT_OUT and front.queued == 1
    conn.s(b"200 ok\r\n")
    # the other gateway: a PORT it rewrote (same growth, the synced correction), its 200
    sent, got = len(PORT), len(b"200 ok\r\n")
    nat.seq_adjust(conn.key, 0, conn.cseq, grow, None)
    conn.cseq, conn.s_rcv = (conn.cseq + sent) & MASK, (conn.s_rcv + sent + grow) & MASK
    conn.sseq, conn.c_rcv = (conn.sseq + got) & MASK, (conn.c_rcv + got) & MASK
    conn.c(b"TYPE I\r\n")  # back here: not queued
    conn.s(b"200 ok\r\n")
    assert front.queued == 1 and alg.counters["resync"] == 0
    for i in (2, 3):
        seg = conn.c(PORT)
        assert seg.payload == PORT_OUT and seg.seq == (conn.cseq - len(PORT) + i * grow) & MASK
        conn.s(b"200 ok\r\n")
    assert alg.counters["resync"] == 1 and alg.counters["seq_compensated"] == 0
    assert any(isinstance(ev, Resynced) for ev in alg.seen) and nat.adj[conn.key][0].after == 4 * grow


def test_a_pinhole_closes_with_its_control_connection():
    """Selected mode: the FINs are queued (conntrack keeps a closed connection, and the
    expectations of its pinholes, for TIME_WAIT's 120 s): an unused pinhole closes with its
    control connection, not at --pinhole-timeout."""
    nat = FakeKernel()
    alg = Driven(nat, selected=True)
    front = Selecting(alg, nat, "10.0.0.2")
    conn = Conn(front, nat)  # type: ignore[arg-type]
    conn.c(b"USER anonymous\r\n")
    conn.s(b"230 ok\r\n")
    assert conn.c(PORT).payload == PORT_OUT and len(nat.live) == 1
    conn.s(b"200 ok\r\n")
    conn.c(b"QUIT\r\n")
    conn.s(b"221 bye\r\n")
    conn.s(b"", "FA")
    assert len(nat.live) == 0 and nat.log == [("open", 1), ("close", 1)]
    conn.c(b"", "FA")
    assert front.queued == 3 and alg.counters["pinholes_closed"] == 1


def test_a_connection_forgotten_at_the_flow_cap_is_read_again_from_its_next_queued_line():
    """Selected mode, at the flow cap: a connection forgotten to make room (its pinhole used)
    and seen again at a later PORT, the lines between stayed in the kernel; there is no SYN
    to tell where lines start, but every segment between ended with a line end (else it was
    queued): the PORT starts a line, and is rewritten. (A new connection that reuses a
    forgotten one's tuple is the same case.)"""
    nat = FakeKernel()
    alg = Driven(nat, selected=True, limits=Limits(max_flows=1))
    front = Selecting(alg, nat, "10.0.0.2")
    a = Conn(front, nat)  # type: ignore[arg-type]
    assert a.c(PORT).payload == PORT_OUT
    nat.use(nat.opened[-1].id)  # its transfer used it
    alg.pinhole_gone(nat.opened[-1].id)
    b = Conn(front, nat, client=("10.0.0.2", 40001), public=("203.0.113.1", 61001))  # type: ignore[arg-type]
    assert b.c(PORT).payload == PORT_OUT and alg.counters["flows_evicted"] == 1
    nat.use(nat.opened[-1].id)
    alg.pinhole_gone(nat.opened[-1].id)
    a.s(b"200 ok\r\n")
    a.c(b"RETR f\r\n")
    a.s(b"150 go\r\n226 done\r\n")
    seg = a.c(PORT)  # b is forgotten now, a tracked again from here
    assert seg.payload == PORT_OUT and alg.counters["flows_evicted"] == 2 and len(nat.opened) == 3


def test_a_new_connection_on_a_closed_ones_tuple_is_read_from_its_first_line():
    """Selected mode: the FINs end a connection at once, corrected or not. A client that
    reuses the tuple soon after shows no SYN (not queued); its first PORT, whose seq may land
    just behind where the old stream stood, is a new connection's line, not a late
    retransmission of the old one."""
    nat = FakeKernel()
    alg = Driven(nat, selected=True)
    front = Selecting(alg, nat, "10.0.0.2")
    old = Conn(front, nat, cisn=100_000)  # type: ignore[arg-type]
    assert old.c(PORT).payload == PORT_OUT
    old.s(b"200 ok\r\n")
    old.c(b"", "FA")
    old.s(b"", "FA")
    assert alg.tracked == 0
    new = Conn(front, nat, cisn=90_000)  # type: ignore[arg-type]
    assert new.c(PORT).payload == PORT_OUT and len(nat.opened) == 2


def test_a_port_announced_again_before_the_kernels_removal_is_read_keeps_its_number():
    """Passive through DNAT, one client address, the server handing out the same port
    again as soon as its data connection came: the kernel consumed session a's expectation
    (its removal not read yet: the book still holds it) when session b's 227 names the port
    again. The kernel takes the new expectation at that port, so the 227 keeps it (a's
    pinhole closes as used). Moved to another public port instead, b's data connection would
    share its reply tuple (server:40310 -> client:port) with an earlier one from the same
    client port still in TIME_WAIT, and the kernel drops its SYN (docs/performance.md)."""
    nat = FakeKernel()
    alg = Driven(nat, selected=True)
    t = TOPOLOGIES["server-dnat"]
    front = Selecting(alg, nat, t["client"][0])
    reply = b"227 Entering Passive Mode (10,1,0,2,157,118).\r\n"  # 10.1.0.2:40310
    out = b"227 Entering Passive Mode (198,51,100,2,157,118).\r\n"
    a = Conn(front, nat, **t)  # type: ignore[arg-type]
    a.c(b"PASV\r\n")
    assert a.s(reply).payload == out
    (held,) = nat.live.values()
    nat.use(held.id)  # its data connection came; the removal is not read yet
    b = Conn(front, nat, **{**t, "client": ("203.0.113.100", 40001), "public": ("203.0.113.100", 40001)})  # type: ignore[arg-type]
    b.c(b"PASV\r\n")
    assert b.s(reply).payload == out
    (ph,) = (p for p in nat.live.values() if p.id != held.id)
    assert (ph.public_port, ph.inside_port) == (40310, 40310)
    assert held not in nat.live.values() and alg.counters["pinholes_used"] == 1
    alg.pinhole_gone(held.id)  # its removal, read late: nothing more
    assert alg.counters["pinholes_used"] == 1 and [p.id for p in alg.promised.values()] == [ph.id]
    # still busy in the kernel (not used): another port, as before
    c = Conn(front, nat, **{**t, "client": ("203.0.113.100", 40002), "public": ("203.0.113.100", 40002)})  # type: ignore[arg-type]
    c.c(b"PASV\r\n")
    assert c.s(reply).payload != out and len(alg.promised) == 2
