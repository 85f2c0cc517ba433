"""Small ctnetlink requests built with ``struct`` on a netlink socket kept open.

``be_liberal(key)``: set ``IP_CT_TCP_FLAG_BE_LIBERAL`` on both directions of one conntrack
entry (an update, IPCTNL_MSG_CT_NEW without NLM_F_CREATE, carrying CTA_PROTOINFO_TCP flags
with their mask, as conntrackd does when it syncs TCP state). Why ftpalg needs it: it rewrites
before conntrack (raw PREROUTING), so conntrack tracks the rewritten stream; after a rewrite
that made a direction *shorter* (``192,168,100,200`` -> ``198,18,0,1``), the peer's ACK,
mapped back into the sender's numbering before conntrack sees it, lies beyond the end
conntrack saw ("ACK is over the upper bound") and the packet is INVALID: not de-NATed, the
session dies. A liberal entry skips the window check for that one control connection only;
ftpalg tracks its sequence space itself. Growing rewrites never need it.

Message layouts from include/uapi/linux/netfilter/nfnetlink_conntrack.h.
"""

from __future__ import annotations

import os
import socket
import struct

from ..core.table import FlowKey

NETLINK_NETFILTER = 12
NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_NEW = 0
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4
NLMSG_ERROR = 2
NLA_F_NESTED = 0x8000
CTA_TUPLE_ORIG, CTA_PROTOINFO = 1, 4
CTA_TUPLE_IP, CTA_TUPLE_PROTO = 1, 2
CTA_IP_V4_SRC, CTA_IP_V4_DST, CTA_IP_V6_SRC, CTA_IP_V6_DST = 1, 2, 3, 4
CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT = 1, 2, 3
CTA_PROTOINFO_TCP = 1
CTA_PROTOINFO_TCP_FLAGS_ORIGINAL, CTA_PROTOINFO_TCP_FLAGS_REPLY = 4, 5
IP_CT_TCP_FLAG_BE_LIBERAL = 0x08


def _attr(kind: int, data: bytes, nested: bool = False) -> bytes:
    n = 4 + len(data)
    return struct.pack("=HH", n, kind | (NLA_F_NESTED if nested else 0)) + data + b"\0" * (-n % 4)


def tuple_attr(key: FlowKey) -> bytes:
    """CTA_TUPLE_ORIG for a TCP connection's original tuple."""
    src, sport, dst, dport = key
    v4 = len(src) == 4
    ip = (_attr(CTA_IP_V4_SRC if v4 else CTA_IP_V6_SRC, src)
          + _attr(CTA_IP_V4_DST if v4 else CTA_IP_V6_DST, dst))
    proto = (_attr(CTA_PROTO_NUM, bytes([socket.IPPROTO_TCP]))
             + _attr(CTA_PROTO_SRC_PORT, struct.pack("!H", sport))
             + _attr(CTA_PROTO_DST_PORT, struct.pack("!H", dport)))
    return _attr(CTA_TUPLE_ORIG, _attr(CTA_TUPLE_IP, ip, True) + _attr(CTA_TUPLE_PROTO, proto, True), True)


def liberal_request(key: FlowKey, seq: int) -> bytes:
    flags = struct.pack("BB", IP_CT_TCP_FLAG_BE_LIBERAL, IP_CT_TCP_FLAG_BE_LIBERAL)
    tcp = _attr(CTA_PROTOINFO_TCP_FLAGS_ORIGINAL, flags) + _attr(CTA_PROTOINFO_TCP_FLAGS_REPLY, flags)
    body = tuple_attr(key) + _attr(CTA_PROTOINFO, _attr(CTA_PROTOINFO_TCP, tcp, True), True)
    family = socket.AF_INET if len(key[0]) == 4 else socket.AF_INET6
    nfgen = struct.pack("=BBH", family, 0, 0)
    kind = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW
    return struct.pack("=IHHII", 16 + len(nfgen) + len(body), kind, NLM_F_REQUEST | NLM_F_ACK, seq, 0) + nfgen + body


class CtNetlink:
    """One NETLINK_NETFILTER socket for the life of ``ftpalg run``."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self._sock.settimeout(1.0)
        self._seq = 0

    def be_liberal(self, key: FlowKey) -> None:
        """Mark the connection whose original tuple is ``key`` liberal; raise OSError on
        failure (e.g. ENOENT: conntrack has no such entry)."""
        self._seq += 1
        self._sock.send(liberal_request(key, self._seq))
        while True:
            reply = self._sock.recv(8192)
            length, kind, _, seq, _ = struct.unpack_from("=IHHII", reply)
            if kind == NLMSG_ERROR and seq == self._seq:
                (err,) = struct.unpack_from("=i", reply, 16)
                if err:
                    raise OSError(-err, f"ctnetlink: {os.strerror(-err)}")
                return

    def close(self) -> None:
        self._sock.close()
