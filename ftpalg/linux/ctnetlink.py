"""Conntrack over netlink (ctnetlink), messages built and parsed with ``struct`` on one socket
kept open for the life of ``ftpalg run`` (no process, no library per request: ~10-20 us each).

What ftpalg asks of the kernel:

- ``get(key)``: a connection's entry by its original tuple: the reply tuple (the NAT mapping),
  its helper, and its sequence adjustment per direction (IPCTNL_MSG_CT_GET).
- ``seq_state(key, direction)``: the kernel's sequence adjustment of one direction.
- ``seq_adjust(key, direction, seq, delta)``: add a length change to the kernel's sequence
  adjustment of one direction (IPCTNL_MSG_CT_NEW updating CTA_SEQ_ADJ_ORIG/REPLY), the way
  nf_nat_mangle_tcp_packet does in the kernel: one correction point per direction,
  ``offset_before`` for segments up to it, ``offset_after`` beyond. The kernel then shifts seq,
  ack and SACK of every later packet itself, conntrack's window tracking knows the offsets,
  and the state survives any restart of ftpalg and is synced by conntrackd.
- ``expect(...)`` / ``unexpect(...)``: create and delete an expectation (IPCTNL_MSG_EXP_NEW /
  EXP_DELETE) with the NAT of ``nat-follow-master``: the data connection becomes RELATED to
  its control connection, is NATed by the kernel like the control connection (mirrored), is
  one-shot and times out. The kernel takes expectations only on a connection that has a
  helper attached; ftpalg attaches the built-in ``sane`` helper to control connections (its
  parser never matches FTP text, so it adds nothing of its own). An expectation is deleted
  as itself, by its tuple and the kernel's id of it (CTA_EXPECT_ID, learnt at creation):
  another expectation that holds the same tuple by then (the first one used, the port
  announced again to the same peer, by another worker) is not touched.

Layouts from include/uapi/linux/netfilter/nfnetlink_conntrack.h and nfnetlink.h.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from ..core.addr import FlowKey
from ..core.seqadj import KernelAdj

NETLINK_NETFILTER = 12
NFNL_SUBSYS_CTNETLINK, NFNL_SUBSYS_CTNETLINK_EXP = 1, 2
IPCTNL_MSG_CT_NEW, IPCTNL_MSG_CT_GET = 0, 1
IPCTNL_MSG_EXP_NEW, IPCTNL_MSG_EXP_GET, IPCTNL_MSG_EXP_DELETE = 0, 1, 2
NLM_F_REQUEST, NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL = 0x1, 0x4, 0x400, 0x200
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLA_F_NESTED = 0x8000
NLA_TYPE_MASK = 0x3FFF
# enum ctattr_type
CTA_TUPLE_ORIG, CTA_TUPLE_REPLY, CTA_HELP = 1, 2, 5
CTA_SEQ_ADJ_ORIG, CTA_SEQ_ADJ_REPLY = 15, 16
CTA_LABELS, CTA_LABELS_MASK = 22, 23
CTA_TUPLE_IP, CTA_TUPLE_PROTO = 1, 2
CTA_IP_V4_SRC, CTA_IP_V4_DST, CTA_IP_V6_SRC, CTA_IP_V6_DST = 1, 2, 3, 4
CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT = 1, 2, 3
CTA_HELP_NAME = 1
CTA_SEQADJ_CORRECTION_POS, CTA_SEQADJ_OFFSET_BEFORE, CTA_SEQADJ_OFFSET_AFTER = 1, 2, 3
# enum ctattr_expect
CTA_EXPECT_MASTER, CTA_EXPECT_TUPLE, CTA_EXPECT_MASK, CTA_EXPECT_TIMEOUT, CTA_EXPECT_ID = 1, 2, 3, 4, 5
CTA_EXPECT_NAT, CTA_EXPECT_FN = 10, 11
CTA_EXPECT_NAT_DIR, CTA_EXPECT_NAT_TUPLE = 1, 2
IP_CT_DIR_ORIGINAL, IP_CT_DIR_REPLY = 0, 1
_MASK32 = 0xFFFFFFFF


class CtError(OSError):
    """A request the kernel refused (errno set), or an answer that makes no sense."""


class NoSeqAdjust(CtError):
    """The connection has no sequence-adjustment extension: the kernel would accept the
    update and ignore it. It gets one only if a helper was attached before NAT was set up,
    i.e. for connections that began while ftpalg's rules were in place."""


NO_ADJ = KernelAdj()
# The timeout the kernel gives an expectation of the ``sane`` helper when it is created
# (nf_conntrack_sane.c: sane_exp_policy.timeout = 5 * 60), whatever CTA_EXPECT_TIMEOUT says.
HELPER_EXPECT_TIMEOUT = 300


@dataclass(frozen=True, slots=True)
class Entry:
    """What ftpalg reads of a conntrack entry."""

    reply: FlowKey
    helper: str | None
    seqadj: tuple[KernelAdj, KernelAdj] | None  # per direction; None: not set (status bit clear)
    orig: FlowKey | None = None
    labels: int = 0  # conntrack labels, bit n = label n


# ---- message building ---------------------------------------------------------------------
def _attr(kind: int, data: bytes, nested: bool = False) -> bytes:
    n = 4 + len(data)
    return struct.pack("=HH", n, kind | (NLA_F_NESTED if nested else 0)) + data + b"\0" * (-n % 4)


# A tuple attribute is the same few nested attributes every time: one struct each for IPv4
# and IPv6 (headers in host order; the ports go in already in network order). Lengths:
# CTA_TUPLE_IP 4 + 2 * (4 + address), CTA_TUPLE_PROTO 4 + 3 * 8 (number: 5 + 3 padding; ports:
# 6 + 2 padding), the whole 4 + both.
_TUPLE4 = struct.Struct("=HH HH HH4s HH4s HH HHB3x HHH2x HHH2x")
_TUPLE6 = struct.Struct("=HH HH HH16s HH16s HH HHB3x HHH2x HHH2x")
_htons = socket.htons


def _tuple(kind: int, src: bytes, sport: int, dst: bytes, dport: int) -> bytes:
    if len(src) == 4:
        return _TUPLE4.pack(52, kind | NLA_F_NESTED, 20, CTA_TUPLE_IP | NLA_F_NESTED, 8, CTA_IP_V4_SRC, src,
                            8, CTA_IP_V4_DST, dst, 28, CTA_TUPLE_PROTO | NLA_F_NESTED, 5, CTA_PROTO_NUM,
                            socket.IPPROTO_TCP, 6, CTA_PROTO_SRC_PORT, _htons(sport), 6, CTA_PROTO_DST_PORT,
                            _htons(dport))
    return _TUPLE6.pack(76, kind | NLA_F_NESTED, 44, CTA_TUPLE_IP | NLA_F_NESTED, 20, CTA_IP_V6_SRC, src,
                        20, CTA_IP_V6_DST, dst, 28, CTA_TUPLE_PROTO | NLA_F_NESTED, 5, CTA_PROTO_NUM,
                        socket.IPPROTO_TCP, 6, CTA_PROTO_SRC_PORT, _htons(sport), 6, CTA_PROTO_DST_PORT,
                        _htons(dport))


def tuple_attr(key: FlowKey, kind: int = CTA_TUPLE_ORIG) -> bytes:
    return _tuple(kind, *key)


def _msg(subsys: int, kind: int, flags: int, seq: int, family: int, body: bytes) -> bytes:
    nfgen = struct.pack("=BBH", family, 0, 0)
    return struct.pack("=IHHII", 20 + len(body), (subsys << 8) | kind, flags, seq, 0) + nfgen + body


def _family(addr: bytes) -> int:
    return socket.AF_INET if len(addr) == 4 else socket.AF_INET6


def _seqadj_attr(kind: int, a: KernelAdj) -> bytes:
    return _attr(kind, _attr(CTA_SEQADJ_CORRECTION_POS, struct.pack("!I", a.pos & _MASK32))
                 + _attr(CTA_SEQADJ_OFFSET_BEFORE, struct.pack("!I", a.before & _MASK32))
                 + _attr(CTA_SEQADJ_OFFSET_AFTER, struct.pack("!I", a.after & _MASK32)), True)


def expect_body(master: FlowKey, peer: bytes, public: bytes, public_port: int, inside_port: int,
                active: bool) -> bytes:
    """CTA_EXPECT_* of an expectation: ``peer`` (any port) -> ``public``:``public_port``,
    RELATED to ``master``, NATed as nat-follow-master does: towards the master's address on
    the far side (active: the client; passive: the server) at ``inside_port``."""
    full = b"\xff" * len(peer)
    nat_dir = IP_CT_DIR_REPLY if active else IP_CT_DIR_ORIGINAL
    return (tuple_attr(master, CTA_EXPECT_MASTER)
            + _tuple(CTA_EXPECT_TUPLE, peer, 0, public, public_port)
            + _tuple(CTA_EXPECT_MASK, full, 0, full, 0xFFFF)
            + _attr(CTA_EXPECT_NAT, _attr(CTA_EXPECT_NAT_DIR, struct.pack("!I", nat_dir))
                    # the kernel keeps the src fields as saved_addr/saved_proto (the port)
                    + _tuple(CTA_EXPECT_NAT_TUPLE, peer, inside_port, public, inside_port), True)
            + _attr(CTA_EXPECT_FN, b"nat-follow-master\0"))


def unexpect_body(peer: bytes, public: bytes, public_port: int, exp_id: int | None) -> bytes:
    """CTA_EXPECT_* of a delete: the expectation ``peer`` -> ``public``:``public_port`` and,
    if given, the kernel's id of the one meant: the kernel then deletes the expectation
    holding the tuple only if it is that one (ENOENT otherwise: ctnetlink_del_expect
    compares it with nf_expect_get_id(), a keyed hash of the object, its master and tuple)."""
    body = _tuple(CTA_EXPECT_TUPLE, peer, 0, public, public_port)
    return body if exp_id is None else body + _attr(CTA_EXPECT_ID, struct.pack("!I", exp_id))


# ---- message parsing ----------------------------------------------------------------------
def _attrs(data: bytes, off: int = 0, end: int | None = None) -> Iterator[tuple[int, bytes]]:
    end = len(data) if end is None else end
    while off + 4 <= end:
        n, kind = struct.unpack_from("=HH", data, off)
        if n < 4 or off + n > end:
            return
        yield kind & NLA_TYPE_MASK, data[off + 4 : off + n]
        off += (n + 3) & ~3


def _parse_tuple(data: bytes) -> FlowKey:
    src = dst = b""
    sport = dport = 0
    for kind, val in _attrs(data):
        if kind == CTA_TUPLE_IP:
            for k, v in _attrs(val):
                if k in (CTA_IP_V4_SRC, CTA_IP_V6_SRC):
                    src = v
                elif k in (CTA_IP_V4_DST, CTA_IP_V6_DST):
                    dst = v
        elif kind == CTA_TUPLE_PROTO:
            for k, v in _attrs(val):
                if k == CTA_PROTO_SRC_PORT:
                    (sport,) = struct.unpack("!H", v[:2])
                elif k == CTA_PROTO_DST_PORT:
                    (dport,) = struct.unpack("!H", v[:2])
    return (src, sport, dst, dport)


def _signed(v: int) -> int:
    return v - (1 << 32) if v & 0x80000000 else v


def _parse_seqadj(data: bytes) -> KernelAdj:
    vals = {k: struct.unpack("!I", v[:4])[0] for k, v in _attrs(data)}
    return KernelAdj(vals.get(CTA_SEQADJ_CORRECTION_POS, 0), _signed(vals.get(CTA_SEQADJ_OFFSET_BEFORE, 0)),
                  _signed(vals.get(CTA_SEQADJ_OFFSET_AFTER, 0)))


def parse_entry(body: bytes) -> Entry:
    """An IPCTNL_MSG_CT_NEW message's attributes (after nlmsghdr and nfgenmsg)."""
    reply: FlowKey | None = None
    orig: FlowKey | None = None
    helper = None
    labels = 0
    adj: dict[int, KernelAdj] = {}
    for kind, val in _attrs(body):
        if kind == CTA_TUPLE_REPLY:
            reply = _parse_tuple(val)
        elif kind == CTA_TUPLE_ORIG:
            orig = _parse_tuple(val)
        elif kind == CTA_HELP:
            for k, v in _attrs(val):
                if k == CTA_HELP_NAME:
                    helper = v.split(b"\0", 1)[0].decode("ascii", "replace")
        elif kind in (CTA_SEQ_ADJ_ORIG, CTA_SEQ_ADJ_REPLY):
            adj[kind] = _parse_seqadj(val)
        elif kind == CTA_LABELS:
            labels = sum(w << (32 * i) for i, w in enumerate(struct.unpack(f"={len(val) // 4}I", val)))
    if reply is None:
        raise CtError(errno.EPROTO, "conntrack entry without reply tuple")
    both = (adj.get(CTA_SEQ_ADJ_ORIG, NO_ADJ), adj.get(CTA_SEQ_ADJ_REPLY, NO_ADJ)) if adj else None
    return Entry(reply, helper, both, orig, labels)


_NLA = struct.Struct("=HH")
_BE32 = struct.Struct("!I")


def parse_expect_id(body: bytes, master: FlowKey) -> int | None:
    """The kernel's id (CTA_EXPECT_ID) in an IPCTNL_MSG_EXP_NEW message's attributes (after
    nlmsghdr and nfgenmsg), if the expectation's master is ``master``; else None. On the
    path of every pinhole: the master is compared as the bytes ftpalg would send for it (the
    kernel's layout, ctnetlink_dump_tuples), parsed only if they differ."""
    exp_id = None
    own = False
    off, end = 0, len(body)
    while off + 4 <= end:
        n, kind = _NLA.unpack_from(body, off)
        if n < 4 or off + n > end:
            break
        kind &= NLA_TYPE_MASK
        if kind == CTA_EXPECT_ID and n == 8:
            (exp_id,) = _BE32.unpack_from(body, off + 4)
        elif kind == CTA_EXPECT_MASTER:
            val = body[off + 4 : off + n]
            own = val == tuple_attr(master)[4:] or _parse_tuple(val) == master
        off += (n + 3) & ~3
    return exp_id if own else None


Request = tuple[int, int, int, int, bytes]  # subsys, kind, flags, family, body


class CtNetlink:
    """One NETLINK_NETFILTER socket for the life of ``ftpalg run``. Not thread-safe.

    ``stats`` counts what went over it: ``sends`` (sendmsg calls), ``waits`` (sends whose
    answers were waited for), ``messages`` (requests in them), ``unacked`` (requests sent
    without waiting: their errors, if any, are read with the next answer waited for) and
    ``late_errors`` (such errors other than ENOENT)."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self._sock.settimeout(1.0)
        self._seq = 0
        # requests sent without waiting (seq -> what, for the log): the kernel answers them
        # only on error, in order, so any answer of theirs comes before that of a later request
        self._unacked: dict[int, str] = {}
        self.stats = dict.fromkeys(("sends", "waits", "messages", "unacked", "late_errors"), 0)
        self.on_late_error: Callable[[str, CtError], None] | None = None

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & _MASK32
        return self._seq

    def _request(self, subsys: int, kind: int, flags: int, family: int, body: bytes) -> list[bytes]:
        """Send one request with NLM_F_ACK; return the bodies of the data messages that came
        before the acknowledgement; raise CtError with the kernel's errno."""
        res = self._requests([(subsys, kind, flags, family, body)])[0]
        if isinstance(res, CtError):
            raise res
        return res

    def _requests(self, reqs: list[Request], ack: bool = True) -> list[list[bytes] | CtError]:
        """Send several requests (each with NLM_F_ACK) in one sendmsg, which the kernel
        handles one after the other, in order (netlink_rcv_skb); return per request the
        bodies of its data messages, or the CtError it got (a failed request does not stop
        the ones after it).

        ``ack=False``: none asks for an acknowledgement, so a request that succeeds without
        data is not answered at all, and the last one must be a get of one object (answered
        by its data or an error): once that answer is read, the kernel has answered all the
        others (in order). One datagram to read instead of one per request."""
        seqs = [self._next_seq() for _ in reqs]
        ackf = NLM_F_ACK if ack else 0
        msgs = [_msg(subsys, kind, NLM_F_REQUEST | ackf | flags, seq, family, body)
                for seq, (subsys, kind, flags, family, body) in zip(seqs, reqs, strict=True)]
        self._sock.send(b"".join(m + b"\0" * (-len(m) % 4) for m in msgs))  # each at NLMSG_ALIGN
        st = self.stats
        st["sends"] += 1
        st["waits"] += 1
        st["messages"] += len(reqs)
        results: dict[int, list[bytes] | CtError] = {}
        data_of: dict[int, list[bytes]] = {seq: [] for seq in seqs}
        last = seqs[-1]
        while (len(results) < len(seqs)) if ack else (last not in results):
            data = self._sock.recv(65536)
            off = 0
            while off + 16 <= len(data):
                length, mtype, _, mseq, _ = struct.unpack_from("=IHHII", data, off)
                if length < 16:
                    raise CtError(errno.EPROTO, "bad netlink message length")
                if mseq in data_of and mseq not in results:
                    if mtype == NLMSG_ERROR:
                        (err,) = struct.unpack_from("=i", data, off + 16)
                        results[mseq] = CtError(-err, f"ctnetlink: {os.strerror(-err)}") if err else data_of[mseq]
                    elif mtype == NLMSG_DONE:
                        results[mseq] = data_of[mseq]
                    else:
                        data_of[mseq].append(data[off + 20 : off + length])  # after nlmsghdr + nfgenmsg
                        if not ack and mseq == last:
                            results[mseq] = data_of[mseq]
                elif mseq in self._unacked and mtype == NLMSG_ERROR:
                    self._late_answer(mseq, struct.unpack_from("=i", data, off + 16)[0])
                off += (length + 3) & ~3
        # every request sent before these has been handled: those sent without waiting that
        # got no answer succeeded
        self._unacked.clear()
        return [results.get(seq, data_of[seq]) for seq in seqs]

    def _late_answer(self, seq: int, err: int) -> None:
        what = self._unacked.pop(seq)
        if err and -err != errno.ENOENT:  # ENOENT: already gone, what was expected
            self.stats["late_errors"] += 1
            if self.on_late_error is not None:
                self.on_late_error(what, CtError(-err, f"ctnetlink: {os.strerror(-err)}"))

    def _send_unacked(self, subsys: int, kind: int, flags: int, family: int, body: bytes, what: str) -> None:
        """Send a request without NLM_F_ACK and without waiting: the kernel handles it before
        send() returns and answers only if it fails; that answer is read (and passed to
        ``on_late_error`` unless ENOENT) with the answer of the next request waited for."""
        seq = self._next_seq()
        self._sock.send(_msg(subsys, kind, NLM_F_REQUEST | flags, seq, family, body))
        self._unacked[seq] = what
        self.stats["sends"] += 1
        self.stats["messages"] += 1
        self.stats["unacked"] += 1

    # ---- connections --------------------------------------------------------------------
    def get(self, key: FlowKey, reply: bool = False) -> Entry | None:
        """The entry whose original tuple (``reply``: reply tuple) is ``key``; None if
        conntrack has none."""
        try:
            bodies = self._request(NFNL_SUBSYS_CTNETLINK, IPCTNL_MSG_CT_GET, 0, _family(key[0]),
                                   tuple_attr(key, CTA_TUPLE_REPLY if reply else CTA_TUPLE_ORIG))
        except CtError as e:
            if e.errno == errno.ENOENT:
                return None
            raise
        if not bodies:
            return None
        return parse_entry(bodies[0])

    def seq_state(self, key: FlowKey, direction: int) -> KernelAdj:
        """The correction the kernel holds for ``direction`` (0 original, 1 reply) of the
        connection (none: ``KernelAdj()``); CtError if it is gone."""
        entry = self.get(key)
        if entry is None:
            raise CtError(errno.ENOENT, "control connection gone from conntrack")
        return (entry.seqadj or (NO_ADJ, NO_ADJ))[direction]

    def seq_adjust(self, key: FlowKey, direction: int, seq: int, delta: int,
                   known: KernelAdj | None = None) -> KernelAdj:
        """Record that the segment of ``direction`` (0 original, 1 reply) starting at
        ``seq`` grew by ``delta`` bytes; return the direction's new correction. Raises
        NoSeqAdjust if the entry cannot carry one, CtError if it is gone.

        ``known``: the direction's correction as the caller knows the kernel holds it (its
        own last update, or a read since which no byte of the connection went by elsewhere);
        then it is not read again. Either way the update of a direction's first correction
        is followed, in the same sendmsg, by a read that tells whether the kernel kept it."""
        fam = _family(key[0])
        if known is None:
            entry = self.get(key)
            if entry is None:
                raise CtError(errno.ENOENT, "control connection gone from conntrack")
            both = entry.seqadj or (NO_ADJ, NO_ADJ)
            known = both[direction]
            first = entry.seqadj is None
        else:
            first = not known.active
        new = known.add(seq, delta)
        attr = CTA_SEQ_ADJ_REPLY if direction else CTA_SEQ_ADJ_ORIG
        update: Request = (NFNL_SUBSYS_CTNETLINK, IPCTNL_MSG_CT_NEW, 0, fam, tuple_attr(key) + _seqadj_attr(attr, new))
        if not first:
            self._request(*update)
            return new
        # first correction: did the kernel keep it? (without the extension it accepts the
        # update and ignores it)
        done, check = self._requests([update, (NFNL_SUBSYS_CTNETLINK, IPCTNL_MSG_CT_GET, 0, fam, tuple_attr(key))])
        if isinstance(done, CtError):
            raise done
        if isinstance(check, CtError) and check.errno != errno.ENOENT:
            raise check
        entry = parse_entry(check[0]) if isinstance(check, list) and check else None
        if entry is None or entry.seqadj is None:
            raise NoSeqAdjust(errno.EOPNOTSUPP, "connection has no sequence-adjustment extension")
        return new

    def label(self, key: FlowKey, bit: int, on: bool) -> None:
        """Set or clear conntrack label ``bit`` (0..127) of the entry, the others untouched."""
        self.labels(key, {bit: on})

    def labels(self, key: FlowKey, bits: dict[int, bool]) -> None:
        """Set or clear conntrack labels (0..127) of the entry, the others untouched
        (CTA_LABELS under CTA_LABELS_MASK: 128 bits as four host-order words), in one
        request. The entry must have the labels extension: the kernel adds it to new
        connections while any rule matches labels."""
        on = sum(1 << b for b, v in bits.items() if v)
        words = sum(1 << b for b in bits)
        mask = struct.pack("=4I", *(words >> (32 * i) & 0xFFFFFFFF for i in range(4)))
        value = struct.pack("=4I", *(on >> (32 * i) & 0xFFFFFFFF for i in range(4)))
        self._request(NFNL_SUBSYS_CTNETLINK, IPCTNL_MSG_CT_NEW, 0, _family(key[0]),
                      tuple_attr(key) + _attr(CTA_LABELS, value) + _attr(CTA_LABELS_MASK, mask))

    # ---- expectations -------------------------------------------------------------------
    def expect(self, master: FlowKey, peer: bytes, public: bytes, public_port: int, inside_port: int,
               active: bool, timeout: int) -> int | None:
        """Create the expectation (EEXIST/EBUSY: the tuple is taken) and return the kernel's
        id of it, for ``unexpect``: read by a get of the tuple in the same sendmsg, neither
        acknowledged (one datagram to read, as for the create alone; nothing can match the
        expectation in between while the caller holds the line that announces it). None if
        that read found no expectation of this master (gone already). NLM_F_ECHO on the
        create would tell the id only through an event, which the kernel sends only for a
        master with the event extension (nf_conntrack_events): measured here, no answer.
        At creation the kernel gives it the helper's timeout (``HELPER_EXPECT_TIMEOUT``); a
        longer ``timeout`` is set by a second request. A shorter one is not: the caller
        deletes the expectation when its own timeout passes (one netlink request less per
        pinhole), and should the caller die first, the kernel's timeout still ends it (or the
        control connection's end)."""
        body = expect_body(master, peer, public, public_port, inside_port, active)
        fam = _family(peer)
        done, got = self._requests([
            (NFNL_SUBSYS_CTNETLINK_EXP, IPCTNL_MSG_EXP_NEW, NLM_F_CREATE | NLM_F_EXCL, fam, body),
            (NFNL_SUBSYS_CTNETLINK_EXP, IPCTNL_MSG_EXP_GET, 0, fam, unexpect_body(peer, public, public_port, None))],
            ack=False)
        exp_id = parse_expect_id(got[0], master) if isinstance(got, list) and got else None
        if isinstance(done, CtError):
            if done.errno in (errno.EEXIST, errno.EBUSY) and exp_id is not None:
                # taken by an expectation of this very control connection: an earlier run of
                # ftpalg's, for the same announcement (a restart between it and its transfer)
                return exp_id
            raise done
        if timeout <= HELPER_EXPECT_TIMEOUT:
            return exp_id
        full = b"\xff" * len(peer)  # an update must name master, tuple and mask again
        update = (tuple_attr(master, CTA_EXPECT_MASTER) + _tuple(CTA_EXPECT_TUPLE, peer, 0, public, public_port)
                  + _tuple(CTA_EXPECT_MASK, full, 0, full, 0xFFFF)
                  + _attr(CTA_EXPECT_TIMEOUT, struct.pack("!I", max(1, int(timeout)))))
        self._request(NFNL_SUBSYS_CTNETLINK_EXP, IPCTNL_MSG_EXP_NEW, 0, fam, update)
        return exp_id

    def unexpect_unacked(self, peer: bytes, public: bytes, public_port: int, exp_id: int | None, what: str) -> None:
        """Delete the expectation for this tuple (only if it is ``exp_id``, when given)
        without waiting for the kernel's answer: for one most likely used already (the
        kernel then answers ENOENT, read later and ignored); any other error reaches
        ``on_late_error`` with ``what``."""
        self._send_unacked(NFNL_SUBSYS_CTNETLINK_EXP, IPCTNL_MSG_EXP_DELETE, 0, _family(peer),
                           unexpect_body(peer, public, public_port, exp_id), what)

    def unexpect(self, peer: bytes, public: bytes, public_port: int, exp_id: int | None = None) -> bool:
        """Delete the expectation for this tuple (only if it is ``exp_id``, when given);
        False if it was gone (used or expired) or another holds the tuple."""
        try:
            self._request(NFNL_SUBSYS_CTNETLINK_EXP, IPCTNL_MSG_EXP_DELETE, 0, _family(peer),
                          unexpect_body(peer, public, public_port, exp_id))
        except CtError as e:
            if e.errno == errno.ENOENT:
                return False
            raise
        return True

    def close(self) -> None:
        self._sock.close()


# ---- expectation events -------------------------------------------------------------------
NFNLGRP_CONNTRACK_EXP_DESTROY = 6
SOL_NETLINK, NETLINK_ADD_MEMBERSHIP = 270, 1


def parse_expect_removals(data: bytes) -> list[tuple[FlowKey, int | None]]:
    """The CTA_EXPECT_TUPLE and CTA_EXPECT_ID (None if absent) of each expectation removal
    in a netlink datagram."""
    out: list[tuple[FlowKey, int | None]] = []
    off = 0
    while off + 16 <= len(data):
        n, kind = struct.unpack_from("=IH", data, off)
        if n < 16 or off + n > len(data):
            break
        if kind & 0xFF == IPCTNL_MSG_EXP_DELETE and kind >> 8 == NFNL_SUBSYS_CTNETLINK_EXP:
            tup: FlowKey | None = None
            exp_id = None
            for k, v in _attrs(data, off + 20, off + n):
                if k == CTA_EXPECT_TUPLE:
                    tup = _parse_tuple(v)
                elif k == CTA_EXPECT_ID and len(v) >= 4:
                    (exp_id,) = _BE32.unpack_from(v)
            if tup is not None:
                out.append((tup, exp_id))
        off += (n + 3) & ~3
    return out


class ExpectationEvents:
    """A netlink socket that hears the kernel remove expectations (used by their data
    connection, timed out, or gone with their master): one message per expectation, only
    expectations, so it stays quiet on a busy gateway. Non-blocking: ``read()`` returns the
    tuples and kernel ids of what was removed since the last call. Every process listening
    (each worker) hears every removal in the namespace, also of expectations not its own."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self._sock.setblocking(False)
        self._sock.bind((0, 0))
        self._sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, NFNLGRP_CONNTRACK_EXP_DESTROY)
        self.overruns = 0  # the kernel dropped events (socket buffer full): pinholes expire instead

    def fileno(self) -> int:
        return self._sock.fileno()

    def read(self) -> list[tuple[FlowKey, int | None]]:
        out: list[tuple[FlowKey, int | None]] = []
        while True:
            try:
                data = self._sock.recv(65536)
            except BlockingIOError:
                return out
            except OSError as e:
                if e.errno == errno.ENOBUFS:
                    self.overruns += 1
                    continue
                raise
            out += parse_expect_removals(data)

    def close(self) -> None:
        self._sock.close()
