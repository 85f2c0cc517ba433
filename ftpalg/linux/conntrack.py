"""NAT mapping of a control connection, read from the kernel's conntrack table over
netlink (pyroute2). Asked once per control connection, when its first PORT/EPRT needs the
public address; never cached here (the core keeps what it needs per flow)."""

from __future__ import annotations

import ipaddress
import logging
import socket

from pyroute2 import Conntrack
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

from ..core.table import FlowKey
from .ctnetlink import CtNetlink

log = logging.getLogger("ftpalg")


class ConntrackLookup:
    def __init__(self) -> None:
        self._ct: dict[int, Conntrack] = {}
        self._failed = 0
        self._nl: CtNetlink | None = None

    def _sock(self, family: int) -> Conntrack:
        ct = self._ct.get(family)
        if ct is None:
            ct = self._ct[family] = Conntrack(nfgen_family=family)
        return ct

    def reply_tuple(self, key: FlowKey) -> FlowKey | None:
        src, sport, dst, dport = key
        family = socket.AF_INET if len(src) == 4 else socket.AF_INET6
        orig = NFCTAttrTuple(
            family=family, saddr=str(ipaddress.ip_address(src)), daddr=str(ipaddress.ip_address(dst)),
            sport=sport, dport=dport, proto=socket.IPPROTO_TCP,
        )
        try:
            msg = self._sock(family).entry("get", tuple_orig=orig)
        except NetlinkError:
            return None  # ENOENT: conntrack has no such connection
        except (OSError, ValueError) as e:  # a broken socket or message: no mapping, said once
            if not self._failed:
                log.warning("conntrack look-up failed: %s", e)
            self._failed += 1
            return None
        if msg is None:
            return None
        reply = msg.get_attr("CTA_TUPLE_REPLY")
        ip = reply.get_attr("CTA_TUPLE_IP")
        proto = reply.get_attr("CTA_TUPLE_PROTO")
        v = "V4" if family == socket.AF_INET else "V6"
        return (
            ipaddress.ip_address(ip.get_attr(f"CTA_IP_{v}_SRC")).packed,
            proto.get_attr("CTA_PROTO_SRC_PORT"),
            ipaddress.ip_address(ip.get_attr(f"CTA_IP_{v}_DST")).packed,
            proto.get_attr("CTA_PROTO_DST_PORT"),
        )

    def be_liberal(self, key: FlowKey) -> None:
        if self._nl is None:
            self._nl = CtNetlink()
        self._nl.be_liberal(key)

    def close(self) -> None:
        if self._nl is not None:
            self._nl.close()
            self._nl = None
        for ct in self._ct.values():
            ct.close()
        self._ct.clear()
