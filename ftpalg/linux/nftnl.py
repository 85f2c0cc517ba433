"""The one nf_tables change ``ftpalg run`` makes while it serves: renewing the timeout of an
element of a set (``rules.keep_alive``, every second), as one netlink transaction on a socket
kept open, instead of an ``nft`` process each time (a fork of the whole interpreter and
~3 ms of nft's CPU every second, with the queue loop waiting meanwhile).

The transaction is what ``nft -f`` makes of "add element (no timeout: a no-op if it is
there); delete element; add element with timeout": a batch (NFNL_MSG_BATCH_BEGIN, three
NFT_MSG_NEWSETELEM / DELSETELEM messages, NFNL_MSG_BATCH_END) that the kernel applies whole or
not at all; the element's timeout then starts again. Message layouts from <linux/netfilter/
nf_tables.h> and <linux/netfilter/nfnetlink.h>, as ``nft --debug=mnl`` shows them."""

from __future__ import annotations

import errno
import os
import socket
import struct

NETLINK_NETFILTER = 12
NLM_F_REQUEST, NLM_F_ACK, NLM_F_CREATE = 0x1, 0x4, 0x400
NLMSG_ERROR = 2
NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 0x10, 0x11
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_NEWSETELEM, NFT_MSG_DELSETELEM = 12, 14
NFPROTO_INET = 1
NFTA_SET_ELEM_LIST_TABLE, NFTA_SET_ELEM_LIST_SET, NFTA_SET_ELEM_LIST_ELEMENTS = 1, 2, 3
NFTA_LIST_ELEM = 1
NFTA_SET_ELEM_KEY, NFTA_SET_ELEM_TIMEOUT = 1, 4
NFTA_DATA_VALUE = 1
NLA_F_NESTED = 0x8000

_HDR = struct.Struct("=IHHII")  # nlmsghdr, host order


class NftError(OSError):
    pass


def _attr(kind: int, value: bytes, nested: bool = False) -> bytes:
    n = 4 + len(value)
    return struct.pack("=HH", n, kind | (NLA_F_NESTED if nested else 0)) + value + b"\0" * (-n % 4)


def _msg(kind: int, flags: int, seq: int, family: int, res_id: int, body: bytes = b"") -> bytes:
    return _HDR.pack(20 + len(body), kind, flags, seq, 0) + struct.pack("!BBH", family, 0, res_id) + body


def element_batch(table: str, set_name: str, key: bytes, timeout_ms: int, seq: int) -> tuple[bytes, list[int]]:
    """The batch that renews element ``key`` of set ``set_name`` in ``table`` (family inet)
    for ``timeout_ms``, its messages numbered from ``seq``; and the sequence numbers whose
    answers (acknowledgements) to wait for."""
    names = _attr(NFTA_SET_ELEM_LIST_TABLE, table.encode() + b"\0") + _attr(NFTA_SET_ELEM_LIST_SET,
                                                                             set_name.encode() + b"\0")
    key_attr = _attr(NFTA_SET_ELEM_KEY, _attr(NFTA_DATA_VALUE, key), True)

    def elements(*extra: bytes) -> bytes:
        return names + _attr(NFTA_SET_ELEM_LIST_ELEMENTS, _attr(NFTA_LIST_ELEM, b"".join(extra) + key_attr, True),
                             True)

    sub = NFNL_SUBSYS_NFTABLES << 8
    ack = NLM_F_REQUEST | NLM_F_ACK
    steps = [(sub | NFT_MSG_NEWSETELEM, ack | NLM_F_CREATE, elements()),
             (sub | NFT_MSG_DELSETELEM, ack, elements()),
             (sub | NFT_MSG_NEWSETELEM, ack | NLM_F_CREATE,
              elements(_attr(NFTA_SET_ELEM_TIMEOUT, struct.pack("!Q", timeout_ms))))]
    seqs = [seq + 1 + i for i in range(len(steps))]
    out = [_msg(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, seq, socket.AF_UNSPEC, NFNL_SUBSYS_NFTABLES)]
    out += [_msg(kind, flags, s, NFPROTO_INET, 0, body) for s, (kind, flags, body) in zip(seqs, steps, strict=True)]
    out.append(_msg(NFNL_MSG_BATCH_END, NLM_F_REQUEST, seq + 1 + len(steps), socket.AF_UNSPEC, NFNL_SUBSYS_NFTABLES))
    return b"".join(out), seqs


class ElementRenewer:
    """A netlink socket kept open (one per process: a forked child opens its own) that renews
    one set element's timeout; ``renew`` raises NftError with the kernel's errno (ENOENT: no
    such table, set or element) or OSError."""

    def __init__(self, timeout: float = 1.0) -> None:
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._pid = 0
        self._seq = 0

    def _socket(self) -> socket.socket:
        if self._sock is None or self._pid != os.getpid():
            self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
            self._sock.settimeout(self.timeout)
            self._pid = os.getpid()
        return self._sock

    def renew(self, table: str, set_name: str, key: bytes, timeout_ms: int) -> None:
        sock = self._socket()
        data, seqs = element_batch(table, set_name, key, timeout_ms, self._seq)
        self._seq = (self._seq + len(seqs) + 2) & 0x7FFFFFFF
        try:
            sock.send(data)
            waiting, failed = set(seqs), 0
            while waiting:
                reply = sock.recv(65536)
                off = 0
                while off + 16 <= len(reply):
                    length, kind, _, seq, _ = _HDR.unpack_from(reply, off)
                    if length < 16:
                        raise NftError(errno.EPROTO, "bad netlink message length")
                    if kind == NLMSG_ERROR and seq in waiting:
                        waiting.discard(seq)
                        (err,) = struct.unpack_from("=i", reply, off + 16)
                        failed = failed or -err
                    off += (length + 3) & ~3
                if failed:  # the kernel aborted the batch: no more answers are due
                    raise NftError(failed, f"nf_tables: {os.strerror(failed)}")
        except NftError:
            raise
        except OSError:  # a timeout or a broken socket: a fresh one next time
            self.close()
            raise

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
