"""ctnetlink requests against a model of the kernel's side of the socket (no root): several
requests in one sendmsg, a known sequence correction not read again, the first correction
checked in the same sendmsg, and deletes whose answers are read later."""

from __future__ import annotations

import errno
import struct

import pytest

from ftpalg.core.seqadj import KernelAdj
from ftpalg.linux import ctnetlink as ct

KEY = (bytes([10, 0, 0, 2]), 40000, bytes([203, 0, 113, 2]), 21)
REPLY = (bytes([203, 0, 113, 2]), 21, bytes([203, 0, 113, 1]), 61000)


class KernelSocket:
    """What the kernel answers, one datagram per answer, as netlink_rcv_skb does: each
    request of a sendmsg in turn, an ACK when asked for one or on error."""

    def __init__(self, extension: bool = True) -> None:
        self.extension = extension  # the entry has a sequence-adjustment extension
        self.seqadj: dict[int, KernelAdj] = {}
        self.expectations: set[bytes] = set()
        self.expect_timeouts: list[int | None] = []  # CTA_EXPECT_TIMEOUT of each EXP_NEW (None: not given)
        self.queue: list[bytes] = []
        self.sends: list[list[int]] = []  # message types per sendmsg

    def send(self, data: bytes) -> int:
        off, kinds = 0, []
        while off < len(data):
            length, mtype, flags, seq, _ = struct.unpack_from("=IHHII", data, off)
            body = data[off + 20 : off + length]
            kinds.append(mtype)
            err = self._handle(mtype, body, seq)
            if err or flags & ct.NLM_F_ACK:
                self.queue.append(struct.pack("=IHHII", 36, ct.NLMSG_ERROR, 0, seq, 0) + struct.pack("=i", -err)
                                  + data[off : off + 16])
            off += (length + 3) & ~3
        self.sends.append(kinds)
        return len(data)

    def _handle(self, mtype: int, body: bytes, seq: int) -> int:
        subsys, kind = mtype >> 8, mtype & 0xFF
        if subsys == ct.NFNL_SUBSYS_CTNETLINK and kind == ct.IPCTNL_MSG_CT_GET:
            attrs = ct.tuple_attr(REPLY, ct.CTA_TUPLE_REPLY)
            for d, a in self.seqadj.items():
                attrs += ct._seqadj_attr(ct.CTA_SEQ_ADJ_REPLY if d else ct.CTA_SEQ_ADJ_ORIG, a)
            msg = struct.pack("=BBH", 2, 0, 0) + attrs
            self.queue.append(struct.pack("=IHHII", 16 + len(msg), ct.IPCTNL_MSG_CT_NEW, 0, seq, 0) + msg)
            return 0
        if subsys == ct.NFNL_SUBSYS_CTNETLINK and kind == ct.IPCTNL_MSG_CT_NEW:
            if self.extension:
                for k, v in ct._attrs(body):
                    if k in (ct.CTA_SEQ_ADJ_ORIG, ct.CTA_SEQ_ADJ_REPLY):
                        self.seqadj[0 if k == ct.CTA_SEQ_ADJ_ORIG else 1] = ct._parse_seqadj(v)
            return 0
        if subsys == ct.NFNL_SUBSYS_CTNETLINK_EXP and kind == ct.IPCTNL_MSG_EXP_NEW:
            self.expect_timeouts.append(next((struct.unpack("!I", v)[0] for k, v in ct._attrs(body)
                                              if k == ct.CTA_EXPECT_TIMEOUT), None))
            return 0
        if subsys == ct.NFNL_SUBSYS_CTNETLINK_EXP and kind == ct.IPCTNL_MSG_EXP_DELETE:
            if body in self.expectations:
                self.expectations.discard(body)
                return 0
            return errno.ENOENT
        return errno.EOPNOTSUPP

    def recv(self, size: int) -> bytes:
        assert self.queue, "recv would block: nothing more was answered"
        return self.queue.pop(0)


@pytest.fixture
def nl():
    c = ct.CtNetlink()
    c._sock.close()
    c._sock = KernelSocket()  # type: ignore[assignment]
    return c


def test_first_correction_reads_then_updates_and_checks_in_one_sendmsg(nl):
    k = nl.seq_adjust(KEY, 0, 1000, 2)
    assert k == KernelAdj(1000, 0, 2) and nl._sock.seqadj[0] == k
    get, new = ct.NFNL_SUBSYS_CTNETLINK << 8 | ct.IPCTNL_MSG_CT_GET, ct.NFNL_SUBSYS_CTNETLINK << 8
    assert nl._sock.sends == [[get], [new, get]]
    assert nl.stats["waits"] == 2 and nl.stats["messages"] == 3


def test_a_known_correction_is_not_read_again(nl):
    k = nl.seq_adjust(KEY, 0, 1000, 2)
    nl._sock.sends.clear()
    k2 = nl.seq_adjust(KEY, 0, 2000, 2, known=k)
    assert k2 == KernelAdj(2000, 2, 4) and nl._sock.seqadj[0] == k2
    assert nl._sock.sends == [[ct.NFNL_SUBSYS_CTNETLINK << 8]]  # the update alone


def test_known_first_correction_is_still_checked(nl):
    nl._sock.extension = False
    with pytest.raises(ct.NoSeqAdjust):
        nl.seq_adjust(KEY, 0, 1000, 2, known=KernelAdj())
    with pytest.raises(ct.NoSeqAdjust):
        nl.seq_adjust(KEY, 0, 1000, 2)


def test_unacked_deletes_are_read_with_the_next_answer(nl):
    errors = []
    nl.on_late_error = lambda what, e: errors.append((what, e.errno))
    peer, public = bytes([203, 0, 113, 2]), bytes([203, 0, 113, 1])
    nl._sock.expectations.add(ct._tuple(ct.CTA_EXPECT_TUPLE, peer, 0, public, 50001))
    nl.unexpect_unacked(peer, public, 50000, "id=1")  # gone already: ENOENT, ignored
    nl.unexpect_unacked(peer, public, 50001, "id=2")  # there: no answer at all
    assert len(nl._sock.queue) == 1 and nl.stats["unacked"] == 2 and nl.stats["waits"] == 0
    nl._sock._handle = lambda mtype, body, seq, h=nl._sock._handle: (  # type: ignore[method-assign]
        errno.EPERM if mtype & 0xFF == ct.IPCTNL_MSG_EXP_DELETE else h(mtype, body, seq))
    nl.unexpect_unacked(peer, public, 50002, "id=3")  # a real failure: reported when read
    assert nl.get(KEY).reply == REPLY  # the next answer waited for drains the earlier ones
    assert errors == [("id=3", errno.EPERM)] and nl.stats["late_errors"] == 1
    assert not nl._sock.queue and not nl._unacked


def test_a_failed_request_in_a_batch_does_not_hide_the_others(nl):
    bad = (ct.NFNL_SUBSYS_CTNETLINK_EXP, ct.IPCTNL_MSG_EXP_DELETE, 0, 2, b"nothing")
    get = (ct.NFNL_SUBSYS_CTNETLINK, ct.IPCTNL_MSG_CT_GET, 0, 2, ct.tuple_attr(KEY))
    first, second = nl._requests([bad, get])
    assert isinstance(first, ct.CtError) and first.errno == errno.ENOENT
    assert isinstance(second, list) and ct.parse_entry(second[0]).reply == REPLY


def _reference_tuple(kind, src, sport, dst, dport):
    """The tuple attribute built attribute by attribute (as the kernel's nla_* would read it)."""
    import socket
    import struct

    def attr(k, data, nested=False):
        n = 4 + len(data)
        return struct.pack("=HH", n, k | (0x8000 if nested else 0)) + data + b"\0" * (-n % 4)

    v4 = len(src) == 4
    ip = attr(1 if v4 else 3, src) + attr(2 if v4 else 4, dst)
    proto = attr(1, bytes([socket.IPPROTO_TCP])) + attr(2, struct.pack("!H", sport)) + attr(3, struct.pack("!H", dport))
    return attr(kind, attr(1, ip, True) + attr(2, proto, True), True)


def test_tuple_attributes_are_built_as_attribute_by_attribute():
    import random

    rng = random.Random(7)
    for _ in range(500):
        n = rng.choice((4, 16))
        src, dst = rng.randbytes(n), rng.randbytes(n)
        sport, dport, kind = rng.randrange(65536), rng.randrange(65536), rng.randrange(1, 12)
        assert ct._tuple(kind, src, sport, dst, dport) == _reference_tuple(kind, src, sport, dst, dport)


@pytest.mark.parametrize("timeout, sent", [(120, [None]), (300, [None]), (600, [None, 600])])
def test_an_expectation_timeout_the_helper_outlasts_is_not_sent(nl, timeout, sent):
    """The kernel gives a new expectation the sane helper's 300 s; only a longer pinhole
    timeout needs the second request (a shorter one is ftpalg's to enforce, by deleting)."""
    nl.expect(KEY, bytes([203, 0, 113, 2]), bytes([203, 0, 113, 1]), 50000, 50000, True, timeout)
    assert nl._sock.expect_timeouts == sent
