"""``Walk.steady``, the short walk for the common segment (the next one of a stream, whole
lines, nothing held), must decide exactly as the general walk would: the same sessions of
test_fuzz.py (ordinary and hostile lines, random cuts, flags, seq skews, duplicates, timer
runs) go through two ALGs, one with the short walk switched off; every verdict, every
released verdict, the counters (but the short walk's own), the pinholes, the kernel's
corrections and the tracked state must come out the same."""

from __future__ import annotations

import random

import pytest
from test_fuzz import TOPOLOGIES, session_steps, topo_addrs

from alg_helpers import MASK, Driven, FakeKernel, FastConn
from ftpalg.core import walk
from ftpalg.core.events import HELD
from ftpalg.core.nat64 import Nat64
from ftpalg.core.policy import Limits

SESSIONS = 500  # per topology


def _alg(topo: str, steady: bool, t: dict | None = None, nat64: Nat64 | None = None
         ) -> tuple[Driven, FakeKernel, FakeKernel, FastConn, list]:
    """``t``: the topology itself (default TOPOLOGIES[topo]); ``nat64``: the core's translator."""
    nat = holes = FakeKernel()
    alg = Driven(nat, rng=random.Random(7), limits=Limits(), nat64=nat64)
    trace: list = []
    if not steady:
        alg.walk.steady = lambda *a: walk._SLOW  # type: ignore[method-assign]
    handle, take = alg.handle, alg.take_released

    def traced_handle(raw, now, token=None):
        out = handle(raw, now, token)
        trace.append(("out", token, out if out is not HELD else "HELD"))
        return out

    def traced_take():
        out = take()
        # in order per connection; between connections the order is that of a set of flows
        trace.append(("released", sorted(out, key=repr)))
        return out

    alg.handle = traced_handle  # type: ignore[method-assign]
    alg.take_released = traced_take  # type: ignore[method-assign]
    conn = FastConn(alg, nat, **(TOPOLOGIES[topo] if t is None else t))
    conn.s(b"220 hi\r\n")
    conn.c(b"USER a\r\n")
    conn.s(b"331 ok\r\n")
    return alg, nat, holes, conn, trace


def _state(alg: Driven, nat: FakeKernel, holes: FakeKernel) -> object:
    flows = []
    for f, d in alg.flows.values():
        if d:
            continue
        s = f.session
        flows.append((f.key, f.reply_key, [(d.stream.next_seq, d.stream.at_line_start) for d in f.dirs],
                      [(dr.adj.base, [(e.start, e.old_len, e.new) for e in dr.adj.edits]) for dr in f.dirs],
                      [dr.kadj for dr in f.dirs], [dr.fin for dr in f.dirs], f.closed_at, f.last_seen,
                      sorted(f.logged), f.pinhole,
                      (list(s.pending), s.count, s.live, s.reply_code, s.reply_cmd, s.reply_found, s.encrypted,
                       s.user, s.last_verb, list(s.paths), s.unrecorded,
                       None if (x := s.xlat) is None else (x.enabled, x.client6, x.translated, dict(x.subs)))))
    return flows, holes.log, {k: list(v) for k, v in nat.adj.items()}


def _run(topo: str, steps: list[tuple], steady: bool, t: dict | None = None, nat64: Nat64 | None = None) -> tuple:
    alg, nat, holes, conn, trace = _alg(topo, steady, t, nat64)
    for side, segs, flags, skew, dup, wait in steps:
        for s in segs:
            for _ in range(2 if dup else 1):
                if side == "c":
                    conn.c(s, flags, seq=None if not skew else (conn.cseq + skew) & MASK)
                else:
                    conn.sseq = (conn.sseq + skew) & MASK
                    conn.s(s, flags)
        if wait:
            conn.now += wait
            alg.expire_held(conn.now)
            alg.take_released()
            alg.tick(conn.now)
    conn.now += 10
    alg.expire_held(conn.now)
    alg.take_released()
    state = _state(alg, nat, holes)
    alg.shutdown()
    return trace, dict(alg.counters), state, holes.log


@pytest.mark.parametrize("topo", sorted(TOPOLOGIES))
def test_steady_walk_decides_as_the_general_walk(topo):
    rng = random.Random(20240611)
    addrs = topo_addrs(topo)
    for i in range(SESSIONS):
        steps = session_steps(rng, addrs)
        fast, slow = _run(topo, steps, True), _run(topo, steps, False)
        for what, a, b in zip(("verdicts", "counters", "state", "pinholes"), fast, slow, strict=True):
            assert a == b, f"session {i} ({what} differ), steps {steps!r}"


def test_steady_walk_is_taken_for_ordinary_lines():
    """Not vacuous: the ordinary lines of a session do take the short walk."""
    alg, nat, holes, conn, trace = _alg("client-nat", True)
    taken = []
    steady = alg.walk.steady
    alg.walk.steady = lambda *a: taken.append(steady(*a)) or taken[-1]  # type: ignore[method-assign]
    conn.c(b"TYPE I\r\n")
    conn.s(b"200 Switching to Binary mode.\r\n")
    conn.c(b"PORT 10,0,0,2,195,80\r\n")
    conn.s(b"200 PORT command successful.\r\n")
    conn.c(b"RETR f\r\n")
    conn.s(b"150 go\r\n226 done\r\n")
    assert len(taken) == 6 and walk._SLOW not in taken
    assert holes.log == [("open", 1), ("close", 1)] and alg.counters["rewrites"] == 1
