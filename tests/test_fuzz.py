"""Fuzzing (hypothesis) of the whole per-packet path ``Alg.handle``, pure core.

Inputs per run (fixed: every test is ``derandomize``d, so CI runs the same inputs each time):

==============================================  ========  ==========================================
test                                            inputs    what one input is
==============================================  ========  ==========================================
``test_random_bytes``                            2 000    random bytes (0-200) as a packet
``test_structured_garbage_packets``              6 000    a packet with random IP/TCP header fields
                                                          (version, IHL, IP options, total length,
                                                          protocol, fragment bits, data offset, TCP
                                                          options, flags, seq/ack), then up to three
                                                          fields broken, aimed at a tracked NATed
                                                          session's addresses (250 examples x 24)
``test_mutated_valid_packets``                   6 000    a valid PORT/EPRT/227/229 segment of a
                                                          tracked session with 1-4 bytes overwritten
                                                          (250 examples x 24)
``test_session_with_hostile_lines_*``            6 000    a control session of 1-12 steps in one of
  (client-nat, server-dnat, ipv6: 250                     three topologies (NAT, DNAT, IPv6): grammar
  examples x 8 sessions each)                             aware PORT/EPRT/LPRT/227/228/229 lines with
                                                          random numbers, separators, families,
                                                          delimiters, lengths (to 5 KiB) and
                                                          terminators, among ordinary commands and
                                                          replies (AUTH TLS/234, multi-line, transfer,
                                                          client-sent 227, TLS bytes), cut into random
                                                          segments, sent with random flags (SYN, FIN,
                                                          RST, URG ...), random seq offsets
                                                          (retransmission, overlap, gap, 2^31),
                                                          duplicates, timer runs, and the sender's
                                                          resends of what the core dropped
**total**                                       20 000
==============================================  ========  ==========================================

Run time: 27 s for the whole module (25 s CPU) measured on a 2-core VM shared with other
jobs (load 3.5), ``pytest -q -p no:cacheprovider tests/test_fuzz.py``; hypothesis' own
bookkeeping per example dominates, hence the batches: one example draws a seed and a batch of
inputs is generated from it with ``random``; a failure names the seed and the input.

Invariants, checked after every packet: nothing raises out of ``Alg.handle``; its verdict is
None, b'', HELD, or a packet that decodes with the core's codec and whose IPv4 header and TCP
checksums verify (``alg_helpers.checksums_valid``); every live pinhole names the real peer
of its control connection, the address the policy allows (the client itself for active mode,
the server itself for passive mode) and a port >= ``Limits.min_port``; at most one live
pinhole per control connection; pinholes opened - closed == live == promised == the sum of
the per-client books; ``tracked`` == the flows in the table; the ``packets`` counter == calls
of ``handle``. At the end of each session every held packet has come back (timers run) and
``shutdown`` leaves no pinhole.
"""

from __future__ import annotations

import ipaddress
import random
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from alg_helpers import MASK, Driven, FakeKernel, FastConn, checksums_valid, pinhole_violations, raw_tcp
from ftpalg.core.alg import Alg
from ftpalg.core.events import HELD, PASS, Drop, Replace
from ftpalg.core.policy import Limits

RANDOM_BYTES = 2000
BATCH = 24  # packets per example (structured, mutated)
PACKET_EXAMPLES = 250
SESSIONS_PER_EXAMPLE = 8
SESSION_EXAMPLES = 250  # per topology: 250 x 8 x 3 = 6 000 sessions
TOTAL_INPUTS = RANDOM_BYTES + 2 * PACKET_EXAMPLES * BATCH + 3 * SESSION_EXAMPLES * SESSIONS_PER_EXAMPLE

_BASE = settings(deadline=None, derandomize=True, suppress_health_check=list(HealthCheck), database=None)


def fuzz(n: int) -> settings:
    return settings(_BASE, max_examples=n)


SEEDS = st.integers(0, 2**32 - 1)

# ---- topologies -----------------------------------------------------------------------------
TOPOLOGIES = {
    "client-nat": dict(client=("10.0.0.2", 40000), server=("203.0.113.2", 21), public=("203.0.113.1", 61000)),
    "server-dnat": dict(client=("203.0.113.100", 40000), server=("10.1.0.2", 21), dest=("198.51.100.2", 21),
                        public=("203.0.113.100", 40000)),
    "ipv6": dict(client=("2001:db8:1::2", 40000), server=("2001:db8:2::2", 21), public=("2001:db8:1::2", 40000)),
}
THIRD = ["198.51.100.7", "10.0.0.3", "127.0.0.1", "0.0.0.0", "255.255.255.255", "2001:db8:9::9", "::1",
         "::ffff:10.0.0.2", "fe80::1%eth0", "2001:db8:1::2%1"]


def topo_addrs(topo: str) -> list[str]:
    t = TOPOLOGIES[topo]
    return [t["client"][0], t["server"][0], t["public"][0], t.get("dest", t["server"])[0], *THIRD]


def _open_conn(topo: str, limits: Limits | None = None) -> tuple[Driven, FakeKernel, FakeKernel, FastConn]:
    nat = holes = FakeKernel()
    alg = Driven(nat, rng=random.Random(7), limits=limits or Limits())
    conn = FastConn(alg, nat, **TOPOLOGIES[topo])
    conn.s(b"220 hi\r\n")
    conn.c(b"USER a\r\n")
    conn.s(b"331 ok\r\n")
    return alg, nat, holes, conn


def _check(alg: Alg, holes: FakeKernel, what: object = "") -> None:
    bad = pinhole_violations(alg, holes)
    assert not bad, (bad, what)


def _verdict_ok(out: object) -> bool:
    return out is PASS or out is HELD or isinstance(out, Drop) or (isinstance(out, Replace)
                                                                   and checksums_valid(out.packet))


def test_stated_total():
    assert TOTAL_INPUTS >= 20000


# ---- (a) random bytes -----------------------------------------------------------------------
_GARBAGE_ENV = _open_conn("client-nat")


@fuzz(RANDOM_BYTES)
@given(st.binary(max_size=200))
def test_random_bytes(data):
    alg, nat, holes, conn = _GARBAGE_ENV
    before = alg.counters["packets"]
    out = alg.handle(data, 0.0)
    assert _verdict_ok(out), data
    assert alg.counters["packets"] == before + 1
    for _, o in alg.take_released():
        assert _verdict_ok(o)
    _check(alg, holes, data)


# ---- (a') structured garbage: every header field at random ---------------------------------
PAYLOADS = [b"", b"PORT 10,0,0,2,195,80\r\n", b"227 (10,1,0,2,195,80)\r\n", b"EPRT |2|2001:db8:1::2|50000|\r\n",
            b"PORT 10,0,0,2,0,22\r\n", b"AUTH TLS\r\n", b"234 go\r\n"]
PORTS = [21, 40000, 61000, 20, 0, 65535]


def garbage_packet(rng: random.Random, addrs: list[str]) -> bytes:
    v6 = rng.random() < 0.4
    fam = [a for a in addrs if (":" in a) == v6 and "%" not in a]
    src, dst = rng.choice(fam), rng.choice(fam)
    sport = rng.choice(PORTS) if rng.random() < 0.8 else rng.getrandbits(16)
    dport = rng.choice(PORTS) if rng.random() < 0.8 else rng.getrandbits(16)
    payload = rng.choice(PAYLOADS) if rng.random() < 0.6 else rng.randbytes(rng.randint(0, 64))
    options = rng.randbytes(rng.choice([0, 0, 1, 2, 3, 4, 8, 10, 12, 20, 40]))
    ip_options = b"" if v6 or rng.random() < 0.7 else rng.randbytes(rng.choice([1, 4, 8, 40]))
    flags = rng.choice([0x18, 0x18, 0x10, 0x02, 0x12, 0x11, 0x04, 0x14]) if rng.random() < 0.7 else rng.getrandbits(8)
    raw = bytearray(raw_tcp(src, dst, sport, dport, rng.getrandbits(32), rng.getrandbits(32), flags, payload,
                            options, ip_options))
    for _ in range(rng.choice([0, 0, 1, 1, 2, 3])):  # then break header fields
        if len(raw) < 40:
            break
        field = rng.choice(["ver", "ihl", "len", "proto", "frag", "doff", "byte", "cut", "pad", "ext"])
        ihl = 40 if v6 else (raw[0] & 15) * 4
        if field == "ver":
            raw[0] = (rng.getrandbits(4) << 4) | (raw[0] & 15)
        elif field == "ihl" and not v6:
            raw[0] = (raw[0] & 0xF0) | rng.getrandbits(4)
        elif field == "len":
            struct.pack_into("!H", raw, 4 if v6 else 2, rng.getrandbits(16))
        elif field == "proto":
            raw[6 if v6 else 9] = rng.choice([0, 1, 17, 41, 43, 44, 47, 58, 60, 132, 255])
        elif field == "frag" and not v6:
            struct.pack_into("!H", raw, 6, rng.getrandbits(16))
        elif field == "doff" and len(raw) > ihl + 12:
            raw[ihl + 12] = (rng.getrandbits(4) << 4) | (raw[ihl + 12] & 15)
        elif field == "byte":
            raw[rng.randrange(len(raw))] = rng.getrandbits(8)
        elif field == "cut":
            del raw[rng.randint(0, len(raw)) :]
        elif field == "pad":
            raw += rng.randbytes(rng.randint(1, 30))
        elif field == "ext" and v6:  # a hop-by-hop / destination options header before TCP
            nh = raw[6]
            raw[6] = rng.choice([0, 60, 43])
            raw[40:40] = bytes([nh, 0]) + b"\x01\x04\0\0\0\0"
            struct.pack_into("!H", raw, 4, len(raw) - 40)
    return bytes(raw)


_STRUCT_ENV = _open_conn("client-nat")


@fuzz(PACKET_EXAMPLES)
@given(SEEDS)
def test_structured_garbage_packets(seed):
    alg, nat, holes, conn = _STRUCT_ENV
    rng = random.Random(seed)
    addrs = topo_addrs("client-nat") + topo_addrs("server-dnat")
    for i in range(BATCH):
        raw = garbage_packet(rng, addrs)
        before = alg.counters["packets"]
        out = alg.handle(raw, conn.now, token=(seed, i))
        assert _verdict_ok(out), (seed, i, raw)
        assert alg.counters["packets"] == before + 1
        for _, o in alg.take_released():
            assert _verdict_ok(o), (seed, i)
        _check(alg, holes, (seed, i, raw))
    conn.now += 1.0
    alg.expire_held(conn.now)
    alg.take_released()
    alg.tick(conn.now)
    _check(alg, holes, seed)


def test_structured_garbage_left_a_working_alg():
    """After the garbage above (same Alg): a new session's good PORT still opens its pinhole."""
    alg, nat, holes, conn = _STRUCT_ENV
    conn.now += 10
    alg.expire_held(conn.now)
    alg.take_released()
    fresh = FastConn(alg, nat, client=("10.0.0.50", 40123), server=("203.0.113.2", 21),
                     public=("203.0.113.1", 61123))
    fresh.now = conn.now
    fresh.s(b"220 hi\r\n")
    fresh.c(b"USER a\r\n")
    fresh.s(b"331 ok\r\n")
    assert fresh.c(b"PORT 10,0,0,50,195,80\r\n").payload == b"PORT 203,0,113,1,195,80\r\n"
    assert any(p.inside == "10.0.0.50" for p in holes.live.values())
    _check(alg, holes)


# ---- mutated valid packets of a tracked session ---------------------------------------------
GOOD_C = {"client-nat": b"PORT 10,0,0,2,195,80\r\n", "server-dnat": b"PORT 203,0,113,100,195,80\r\n",
          "ipv6": b"EPRT |2|2001:db8:1::2|50000|\r\n"}
GOOD_S = {"client-nat": b"227 Entering Passive Mode (203,0,113,2,195,80)\r\n",
          "server-dnat": b"227 Entering Passive Mode (10,1,0,2,195,80)\r\n",
          "ipv6": b"229 Entering Extended Passive Mode (|||50000|)\r\n"}


@fuzz(PACKET_EXAMPLES)
@given(SEEDS)
def test_mutated_valid_packets(seed):
    rng = random.Random(seed)
    topo = rng.choice(list(TOPOLOGIES))
    alg, nat, holes, conn = _open_conn(topo)
    t = TOPOLOGIES[topo]
    client, server, public = t["client"], t["server"], t["public"]
    dest = t.get("dest", server)
    conn.c(b"PASV\r\n")
    for i in range(BATCH):
        if rng.random() < 0.5:
            raw = bytearray(raw_tcp(client[0], dest[0], client[1], dest[1], conn.cseq, conn.c_rcv, "PA", GOOD_C[topo]))
        else:
            raw = bytearray(raw_tcp(server[0], public[0], server[1], public[1], conn.sseq, conn.s_rcv, "PA",
                                    GOOD_S[topo]))
        for _ in range(rng.randint(1, 4)):
            raw[rng.randrange(len(raw))] = rng.getrandbits(8)
        out = alg.handle(bytes(raw), conn.now, token=(seed, i))
        assert _verdict_ok(out), (seed, i, bytes(raw))
        for _, o in alg.take_released():
            assert _verdict_ok(o), (seed, i)
        _check(alg, holes, (seed, i, bytes(raw)))
        if rng.random() < 0.2:
            conn.now += 1.0
            alg.expire_held(conn.now)
            alg.take_released()
    alg.shutdown()
    assert not holes.live


# ---- grammar-aware hostile lines in tracked sessions ----------------------------------------
SPECIAL_NUMS = [0, 1, 4, 22, 25, 195, 255, 256, 999, 1000, 65535, 65536, 99999, 10**9]
SEPS = [b",", b",", b",", b",", b" , ", b",,", b";", b".", b" "]
ENDS = [b"\r\n", b"\r\n", b"\r\n", b"\n", b"\r", b"", b" \r\n", b"\x00\r\n", b"\r\r\n"]
PORTNUMS = [0, 1, 20, 21, 22, 25, 80, 1023, 1024, 1025, 50000, 65535]


def _num(rng: random.Random) -> int:
    return rng.choice(SPECIAL_NUMS) if rng.random() < 0.3 else rng.randint(0, 300)


def _pick(rng: random.Random, addrs: list[str], good: str) -> str:
    """Half the time the address the policy accepts (so pinholes do open), else any."""
    return good if rng.random() < 0.5 else rng.choice(addrs)


def _octets(rng: random.Random, addrs: list[str], good: str) -> list[int]:
    a = _pick(rng, addrs, good)
    if ":" in a or rng.random() < 0.2:
        return [_num(rng) for _ in range(4)]
    return [int(x) for x in a.split(".")]


def _port_pair(rng: random.Random) -> list[int]:
    if rng.random() < 0.6:
        p = rng.choice(PORTNUMS) if rng.random() < 0.5 else rng.randint(0, 65535)
        return [p >> 8, p & 255]
    return [_num(rng), _num(rng)]


def _join(nums: list[int], sep: bytes) -> bytes:
    return sep.join(str(n).encode() for n in nums)


def address_line(rng: random.Random, addrs: list[str], side: str = "") -> bytes:
    """A line that carries (or looks like it carries) an address; mostly of the kind the
    ``side`` ("c" client, "s" server) sends, sometimes of the other."""
    kinds = {"c": ["PORT", "EPRT", "LPRT"], "s": ["227", "228", "229"]}.get(side) if rng.random() < 0.85 else None
    kind = rng.choice(kinds or ["PORT", "EPRT", "LPRT", "227", "228", "229"])
    sep = rng.choice(SEPS) if rng.random() < 0.3 else b","
    v4 = [a for a in addrs if ":" not in a]
    good = addrs[0] if kind in ("PORT", "EPRT", "LPRT") else rng.choice(addrs[1:4])  # client / server, public
    if kind == "PORT":
        verb = rng.choice([b"PORT", b"PORT", b"port", b"PoRt", b"PORTX", b" PORT", b"PORT\x00"])
        nums = _octets(rng, v4, good) + _port_pair(rng)
        if rng.random() < 0.15:
            nums = nums[: rng.randint(0, 7)] + [_num(rng)] * rng.randint(0, 2)
        body = verb + rng.choice([b" ", b" ", b"  ", b"\t", b""]) + _join(nums, sep)
    elif kind == "EPRT":
        d = rng.choice([b"|", b"|", b"!", b"1", b" ", b"\xff"])
        af = rng.choice([b"1", b"2", b"1", b"2", b"3", b"", b"01"])
        a = _pick(rng, [*addrs, "", "1.2.3", "::ffff:1.2.3.4", "010.0.0.2"], good)
        port = rng.choice([b"0", b"22", b"1023", b"1024", b"50000", b"65536", b"-1", b"+5", b" 5",
                           str(rng.randint(0, 99999)).encode()])
        body = b"EPRT " + d + af + d + a.encode() + d + port + d + rng.choice([b"", b"", b"|", b"x"])
    elif kind in ("LPRT", "228"):
        if rng.random() < 0.6:
            try:
                host = list(ipaddress.ip_address(_pick(rng, addrs, good).split("%")[0]).packed)
            except ValueError:
                host = [1, 2, 3, 4]
            nums = [6 if len(host) == 16 else 4, len(host), *host, 2, *_port_pair(rng)]
            if rng.random() < 0.2:
                nums[rng.randrange(len(nums))] = _num(rng)
        else:
            nums = [_num(rng) for _ in range(rng.randint(0, 22))]
        args = _join(nums, sep)
        body = b"LPRT " + args if kind == "LPRT" else b"228 Entering Long Passive Mode (" + args + b")"
    elif kind == "227":
        nums = _octets(rng, v4, good) + _port_pair(rng)
        body = rng.choice([b"227 Entering Passive Mode (", b"227 =", b"227-", b"227 ", b" (", b"227 x "]) \
            + _join(nums, sep) + rng.choice([b")", b").", b"", b",7)"])
    else:
        d = rng.choice([b"|", b"|", b"!", b"1", b"("])
        port = rng.choice([b"22", b"50000", b"", b"0", str(rng.randint(0, 99999)).encode()])
        body = b"229 Entering Extended Passive Mode (" + d + d + d + port + d + b")"
    if rng.random() < 0.12:
        body = rng.randbytes(rng.randint(1, 8)) + body  # not at a line start
    if rng.random() < 0.08:
        body += b" " + b"A" * rng.randint(0, 5000)  # overlong
    return body + rng.choice(ENDS)


ORDINARY_C = [b"PASV\r\n", b"EPSV\r\n", b"LPSV\r\n", b"PASV\r\n", b"EPSV\r\n", b"SYST\r\n", b"NOOP\r\n",
              b"RETR f\r\n", b"LIST\r\n", b"AUTH TLS\r\n", b"TYPE I\r\n", b"STAT\r\n", b"EPSV ALL\r\n",
              b"227 spoof (10,0,0,2,195,80)\r\n", b"QUIT\r\n", b"NOOP xx"]
ORDINARY_S = [b"200 ok\r\n", b"150 go\r\n", b"226 done\r\n", b"234 go TLS\r\n", b"425 no\r\n", b"500 what\r\n",
              b"211-status\r\n", b"211 end\r\n", b"227-multi\r\n", b"227 end\r\n", b"229 no port here\r\n",
              b"421 bye\r\n", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", b"200 partial "]
FLAGS = ["PA"] * 60 + ["A", "FA", "RA", "R", "S", "SA", "PAU", "FPA", "SPA", "PAE"]
SKEWS = [0] * 60 + [-1, -5, -40, 1, 5, 40, 20000, 1 << 31]
WAITS = [0.0] * 8 + [0.3, 0.6, 3.0, 200.0]


def session_steps(rng: random.Random, addrs: list[str]) -> list[tuple]:
    steps = []
    for n in range(rng.randint(1, 12)):
        side = "cs"[n % 2] if rng.random() < 0.8 else rng.choice("cs")  # mostly command, reply, ...
        lines = [rng.choice(ORDINARY_C if side == "c" else ORDINARY_S) if rng.random() < 0.35
                 else address_line(rng, addrs, side) for _ in range(rng.randint(1, 3))]
        data = b"".join(lines)
        cuts = sorted(rng.sample(range(1, len(data)), min(rng.choice([0, 0, 1, 2, 3]), len(data) - 1)))
        segs = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
        steps.append((side, segs, rng.choice(FLAGS), rng.choice(SKEWS), rng.random() < 0.15, rng.choice(WAITS)))
    return steps


def run_session(topo: str, steps: list[tuple], limits: Limits | None = None) -> None:
    alg, nat, holes, conn = _open_conn(topo, limits)
    _check(alg, holes)
    held: set = set()  # tokens (side, seq, payload) whose verdict waits
    sides: dict = {}

    def send(side: str, seq: int | None, payload: bytes, flags: str) -> None:
        if side == "c":
            tok = (conn.cseq if seq is None else seq, payload)
            conn.c(payload, flags, seq=seq)
        else:
            if seq is not None:
                conn.sseq, keep = seq, conn.sseq
            tok = (conn.sseq, payload)
            conn.s(payload, flags)
            if seq is not None:
                conn.sseq = keep
        sides[tok] = side
        if conn.held_last:
            held.add(tok)
        settle(conn.released)

    tries: dict = {}

    def settle(released) -> None:
        for tk, o in released:
            held.discard(tk)
            if o is None and tk in sides and tries.get(tk, 0) < 3:  # dropped: TCP resends it (a few times)
                tries[tk] = tries.get(tk, 0) + 1
                resend.append((sides[tk], tk))

    resend: list = []
    for n, (side, segs, flags, skew, dup, wait) in enumerate(steps):
        for s in segs:
            for _ in range(2 if dup else 1):
                if side == "c":
                    send("c", None if not skew else (conn.cseq + skew) & MASK, s, flags)
                else:
                    conn.sseq = (conn.sseq + skew) & MASK
                    send("s", None, s, flags)
                _check(alg, holes, (n, steps[n]))
        if wait:
            conn.now += wait
            alg.expire_held(conn.now)
            settle([(tk, None if isinstance(o, Drop) else o) for tk, o in alg.take_released()])
            alg.tick(conn.now)
            _check(alg, holes, (n, "tick"))
        while resend:  # the sender's retransmissions of what was dropped, in order
            rs, (seq, payload) = resend.pop(0)
            send(rs, seq, payload, "PA")
            _check(alg, holes, (n, "resend"))
    for _ in range(3):  # nothing stays held once the timers have run
        conn.now += 10
        alg.expire_held(conn.now)
        for tk, _ in alg.take_released():
            held.discard(tk)
    assert not held, held
    assert alg.counters["packets"] == conn.handled
    alg.shutdown()
    assert not holes.live and not alg.promised and not alg.per_client


def _session_test(topo: str):
    @fuzz(SESSION_EXAMPLES)
    @given(SEEDS)
    def test(seed):
        rng = random.Random(seed)
        addrs = topo_addrs(topo)
        for _ in range(SESSIONS_PER_EXAMPLE):
            steps = session_steps(rng, addrs)
            try:
                run_session(topo, steps)
            except AssertionError as e:
                raise AssertionError(f"seed {seed}, steps {steps!r}") from e

    test.__name__ = f"test_session_with_hostile_lines_{topo.replace('-', '_')}"
    return test


test_session_with_hostile_lines_client_nat = _session_test("client-nat")
test_session_with_hostile_lines_server_dnat = _session_test("server-dnat")
test_session_with_hostile_lines_ipv6 = _session_test("ipv6")


def test_the_invariant_checks_can_fail():
    """The oracles above are not vacuous: a pinhole to a service port, to a third host, a
    second one for the same control connection, books out of step, and a packet with a bad
    checksum are all caught."""
    import dataclasses

    alg, nat, holes, conn = _open_conn("client-nat")
    conn.c(b"PORT 10,0,0,2,195,80\r\n")
    assert pinhole_violations(alg, holes) == []
    (good,) = holes.live.values()
    for bad in (dataclasses.replace(good, inside_port=22), dataclasses.replace(good, inside="10.0.0.3"),
                dataclasses.replace(good, peer="198.51.100.7")):
        holes.live[good.id] = bad
        assert pinhole_violations(alg, holes)
    holes.live[good.id] = good
    holes.live[99] = dataclasses.replace(good, id=99, public_port=50001)
    assert any("2 pinholes" in v for v in pinhole_violations(alg, holes))
    del holes.live[99]
    alg.counters["pinholes_closed"] += 1
    assert pinhole_violations(alg, holes)
    raw = bytearray(raw_tcp("10.0.0.2", "203.0.113.2", 40000, 21, 1, 1, "PA", b"NOOP\r\n"))
    assert checksums_valid(bytes(raw))
    raw[-1] ^= 1
    assert not checksums_valid(bytes(raw))
