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

import random

import pytest
from test_fuzz import TOPOLOGIES

from alg_helpers import Driven, FakeKernel, FastConn
from ftpalg.core import packet
from ftpalg.core.events import PASS
from ftpalg.linux import rules

SESSIONS = 150  # per topology
VERBS = (b"PORT", b"EPRT", b"LPRT", b"PASV", b"EPSV", b"LPSV", b"AUTH")
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


class Selecting:
    """The kernel's queue rules in front of a core: a segment they do not select passes
    unchanged (the kernel's seqadj still applies to it, as FakeKernel.kernel plays it)."""

    def __init__(self, alg: Driven, kernel: FakeKernel, client: str) -> None:
        self.alg, self.kernel, self.client = alg, kernel, client
        self.queued = 0

    def handle(self, raw: bytes, now: float, token: object = None):
        seg = packet.decode(raw)
        key = (seg.src, seg.sport, seg.dst, seg.dport)
        from_client = str(__import__("ipaddress").ip_address(seg.src)) == self.client
        followed = any(k in self.kernel.following for k in (key, *self._originals(key)))
        if not kernel_selects(seg.payload, from_client, followed):
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


def _run(topo: str, steps: list[tuple[str, list[bytes]]], selected: bool) -> tuple:
    kernel = FakeKernel()
    alg = Driven(kernel, rng=random.Random(7), selected=selected)
    t = TOPOLOGIES[topo]
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
