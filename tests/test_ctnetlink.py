"""ctnetlink requests against a model of the kernel's side of the socket (no root): several
requests in one sendmsg, a known sequence correction not read again, the first correction
checked in the same sendmsg, deletes whose answers are read later, and expectations deleted
as themselves (tuple and kernel id), never another that holds the same tuple."""

from __future__ import annotations

import errno
import itertools
import struct

import pytest

from ftpalg.core.seqadj import KernelAdj
from ftpalg.linux import ctnetlink as ct

KEY = (bytes([10, 0, 0, 2]), 40000, bytes([203, 0, 113, 2]), 21)
KEY2 = (bytes([10, 0, 0, 2]), 40001, bytes([203, 0, 113, 2]), 21)  # another control connection
PEER, PUBLIC = bytes([203, 0, 113, 2]), bytes([203, 0, 113, 1])
EXP_NEW = ct.NFNL_SUBSYS_CTNETLINK_EXP << 8 | ct.IPCTNL_MSG_EXP_NEW
EXP_GET = ct.NFNL_SUBSYS_CTNETLINK_EXP << 8 | ct.IPCTNL_MSG_EXP_GET
EXP_DELETE = ct.NFNL_SUBSYS_CTNETLINK_EXP << 8 | ct.IPCTNL_MSG_EXP_DELETE
REPLY = (bytes([203, 0, 113, 2]), 21, bytes([203, 0, 113, 1]), 61000)


_KERNEL_IDS = itertools.count(0x9E3779B1)  # each expectation its own id, whichever socket made it


class KernelSocket:
    """What the kernel answers, one datagram per answer, as netlink_rcv_skb does: each
    request of a sendmsg in turn, an ACK when asked for one or on error."""

    def __init__(self, extension: bool = True, helper: str | None = "sane") -> None:
        self.extension = extension  # the entry has a sequence-adjustment extension
        self.helper = helper  # the entry's conntrack helper (ftpalg's rules attach "sane")
        self.seqadj: dict[int, KernelAdj] = {}
        # expectation tuple attribute -> (kernel id, CTA_EXPECT_MASTER attribute), as the
        # kernel's table: one expectation per tuple, each with an id of its own
        self.expectations: dict[bytes, tuple[int, bytes]] = {}
        self.expect_timeouts: list[int | None] = []  # CTA_EXPECT_TIMEOUT of each EXP_NEW (None: not given)
        self.queue: list[bytes] = []
        self.flags = 0
        self.recvs = 0  # datagrams read
        self.sends: list[list[int]] = []  # message types per sendmsg

    def send(self, data: bytes) -> int:
        off, kinds = 0, []
        while off < len(data):
            length, mtype, flags, seq, _ = struct.unpack_from("=IHHII", data, off)
            body = data[off + 20 : off + length]
            kinds.append(mtype)
            self.flags = flags  # of the request being handled
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
            if self.helper is not None:
                attrs += ct._attr(ct.CTA_HELP, ct._attr(ct.CTA_HELP_NAME, self.helper.encode() + b"\0"), True)
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
        if subsys != ct.NFNL_SUBSYS_CTNETLINK_EXP:
            return errno.EOPNOTSUPP
        attrs = dict(ct._attrs(body))
        if ct.CTA_EXPECT_TUPLE not in attrs:
            return errno.ENOENT
        tup = ct._attr(ct.CTA_EXPECT_TUPLE, attrs[ct.CTA_EXPECT_TUPLE], True)
        held = self.expectations.get(tup)
        if kind == ct.IPCTNL_MSG_EXP_NEW:
            timeout = attrs.get(ct.CTA_EXPECT_TIMEOUT)
            self.expect_timeouts.append(None if timeout is None else struct.unpack("!I", timeout)[0])
            if held is None:
                if self.flags & ct.NLM_F_CREATE == 0:
                    return errno.ENOENT
                master = ct._attr(ct.CTA_EXPECT_MASTER, attrs[ct.CTA_EXPECT_MASTER], True)
                self.expectations[tup] = (next(_KERNEL_IDS), master)
                return 0
            return errno.EEXIST if self.flags & ct.NLM_F_EXCL else 0
        if held is None:
            return errno.ENOENT
        if ct.CTA_EXPECT_ID in attrs and struct.unpack("!I", attrs[ct.CTA_EXPECT_ID])[0] != held[0]:
            return errno.ENOENT  # ctnetlink_get_expect / ctnetlink_del_expect: not that one
        if kind == ct.IPCTNL_MSG_EXP_GET:
            msg = struct.pack("=BBH", 2, 0, 0) + held[1] + tup + ct._attr(ct.CTA_EXPECT_ID, struct.pack("!I", held[0]))
            self.queue.append(struct.pack("=IHHII", 16 + len(msg), ct.NFNL_SUBSYS_CTNETLINK_EXP << 8, 0, seq, 0) + msg)
            return 0
        if kind == ct.IPCTNL_MSG_EXP_DELETE:
            del self.expectations[tup]
            return 0
        return errno.EOPNOTSUPP

    def consume(self, peer: bytes, public: bytes, public_port: int) -> None:
        """A data connection matched the expectation of this tuple: the kernel removed it."""
        del self.expectations[ct._tuple(ct.CTA_EXPECT_TUPLE, peer, 0, public, public_port)]

    def recv(self, size: int) -> bytes:
        assert self.queue, "recv would block: nothing more was answered"
        self.recvs += 1
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
    exp_id = nl.expect(KEY, PEER, PUBLIC, 50001, 50001, True, 120)
    nl.stats.update(waits=0)
    nl.unexpect_unacked(PEER, PUBLIC, 50000, None, "id=1")  # gone already: ENOENT, ignored
    nl.unexpect_unacked(PEER, PUBLIC, 50001, exp_id, "id=2")  # there: no answer at all
    assert len(nl._sock.queue) == 1 and nl.stats["unacked"] == 2 and nl.stats["waits"] == 0
    assert not nl._sock.expectations
    nl._sock._handle = lambda mtype, body, seq, h=nl._sock._handle: (  # type: ignore[method-assign]
        errno.EPERM if mtype & 0xFF == ct.IPCTNL_MSG_EXP_DELETE else h(mtype, body, seq))
    nl.unexpect_unacked(PEER, PUBLIC, 50002, None, "id=3")  # a real failure: reported when read
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
    exp_id = nl.expect(KEY, PEER, PUBLIC, 50000, 50000, True, timeout)
    assert nl._sock.expect_timeouts == sent
    assert nl._sock.sends == [[EXP_NEW, EXP_GET]] + [[EXP_NEW]] * (len(sent) - 1)  # the id read with the create
    assert exp_id is not None and exp_id == nl._sock.expectations[ct.unexpect_body(PEER, PUBLIC, 50000, None)][0]



def test_expect_learns_the_kernel_id_in_the_same_sendmsg(nl):
    exp_id = nl.expect(KEY, PEER, PUBLIC, 50000, 50000, True, 120)
    held = nl._sock.expectations[ct._tuple(ct.CTA_EXPECT_TUPLE, PEER, 0, PUBLIC, 50000)]
    assert exp_id == held[0]
    assert nl._sock.sends == [[EXP_NEW, EXP_GET]]  # one sendmsg, one wait: as before the id
    assert nl.stats["waits"] == 1 and nl.stats["messages"] == 2
    assert nl._sock.recvs == 1 and not nl._sock.queue  # neither acknowledged: the get's answer alone


def test_a_refused_create_is_read_before_the_get_answers(nl):
    """Without acknowledgements, the create's error (the tuple is taken by another control
    connection) comes first, then the get's answer: the other's expectation, not ours."""
    nl.expect(KEY2, PEER, PUBLIC, 50000, 50000, True, 120)
    with pytest.raises(ct.CtError) as e:
        nl.expect(KEY, PEER, PUBLIC, 50000, 50000, True, 120)
    assert e.value.errno == errno.EEXIST and not nl._sock.queue


def test_a_delete_spares_another_expectation_of_the_same_tuple(nl):
    """The first expectation is used (the kernel removes it), the port is announced to the
    same peer again on another control connection (another worker's): the late deletes of
    the first, waited for or not, leave the second alone; its own delete removes it."""
    errors = []
    nl.on_late_error = lambda what, e: errors.append((what, e.errno))
    first = nl.expect(KEY, PEER, PUBLIC, 50000, 50000, False, 120)
    nl._sock.consume(PEER, PUBLIC, 50000)
    second = nl.expect(KEY2, PEER, PUBLIC, 50000, 50000, False, 120)
    assert first is not None and second is not None and first != second
    nl.unexpect_unacked(PEER, PUBLIC, 50000, first, "id=1")
    assert nl.unexpect(PEER, PUBLIC, 50000, first) is False  # reads the unacked one's ENOENT too
    assert len(nl._sock.expectations) == 1 and not errors and nl.stats["late_errors"] == 0
    assert nl.unexpect(PEER, PUBLIC, 50000, second) is True and not nl._sock.expectations
    assert nl._sock.sends[-1] == [EXP_DELETE]


def test_an_expectation_gone_before_its_id_is_read_has_none(nl):
    handle = nl._sock._handle

    def consumed_at_once(mtype, body, seq):
        err = handle(mtype, body, seq)
        if mtype == EXP_NEW and not err:
            nl._sock.consume(PEER, PUBLIC, 50000)
        return err

    nl._sock._handle = consumed_at_once
    assert nl.expect(KEY, PEER, PUBLIC, 50000, 50000, True, 120) is None
    # read back, the tuple held by another control connection's expectation: not ours either
    nl._sock._handle = handle
    nl.expect(KEY2, PEER, PUBLIC, 50000, 50000, True, 120)
    get = nl._requests([(ct.NFNL_SUBSYS_CTNETLINK_EXP, ct.IPCTNL_MSG_EXP_GET, 0, 2,
                         ct.unexpect_body(PEER, PUBLIC, 50000, None))])[0]
    assert isinstance(get, list)
    assert ct.parse_expect_id(get[0], KEY) is None and ct.parse_expect_id(get[0], KEY2) is not None


@pytest.mark.parametrize("peer, public", [(PEER, PUBLIC), (bytes(range(16)), bytes(range(16, 32)))])
def test_delete_messages_are_built_attribute_by_attribute(peer, public):
    """EXP_DELETE's attributes: CTA_EXPECT_TUPLE (peer, any port -> public:port), and the
    kernel's id as CTA_EXPECT_ID (type 5, a big-endian u32, as nla_get_be32 reads it)."""
    tup = _reference_tuple(ct.CTA_EXPECT_TUPLE, peer, 0, public, 50000)
    assert ct.unexpect_body(peer, public, 50000, None) == tup
    with_id = ct.unexpect_body(peer, public, 50000, 0x01020304)
    assert with_id == tup + struct.pack("=HH", 8, 5) + bytes([1, 2, 3, 4])
    assert dict(ct._attrs(with_id))[ct.CTA_EXPECT_ID] == bytes([1, 2, 3, 4])


def test_the_kernel_id_is_read_from_its_attribute():
    master = ct.tuple_attr(KEY, ct.CTA_EXPECT_MASTER)
    tup = ct._tuple(ct.CTA_EXPECT_TUPLE, PEER, 0, PUBLIC, 50000)
    ident = struct.pack("=HH", 8, ct.CTA_EXPECT_ID) + struct.pack("!I", 0xDEADBEEF)
    timeout = struct.pack("=HH", 8, ct.CTA_EXPECT_TIMEOUT) + struct.pack("!I", 300)
    assert ct.parse_expect_id(master + tup + timeout + ident, KEY) == 0xDEADBEEF
    assert ct.parse_expect_id(ident + tup + master, KEY) == 0xDEADBEEF  # in any order
    assert ct.parse_expect_id(master + tup, KEY) is None  # no id
    assert ct.parse_expect_id(master + tup + ident, KEY2) is None  # another control connection's
