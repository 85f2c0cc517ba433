"""Addresses and connection keys, as the core holds and shows them.

A connection is keyed by the (src, sport, dst, dport) of its packets as the gateway's hook
sees them, addresses packed (4 or 16 bytes, as in the IP header): the per-packet walk
builds a key from a decoded header without converting anything. Text forms are made only
for people (logs, status, audit) and for the pinhole (which the kernel port packs again).
"""

from __future__ import annotations

import ipaddress
import socket

FlowKey = tuple[bytes, int, bytes, int]
NO_KEY: FlowKey = (b"", 0, b"", 0)


def addr_text(packed: bytes) -> str:
    """The text of a packed address (the same text ``ipaddress`` gives)."""
    if len(packed) == 4:  # in a tenth of ipaddress's time
        return socket.inet_ntop(socket.AF_INET, packed)
    return str(ipaddress.ip_address(packed))


def packed(addr: str) -> bytes:
    """The packed form of an address's text (4 bytes for IPv4, 16 for IPv6)."""
    return socket.inet_pton(socket.AF_INET6 if ":" in addr else socket.AF_INET, addr)


def hostport(addr: str, port: int) -> str:
    """``a.b.c.d:port``, or ``[v6]:port``."""
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def key_text(key: FlowKey) -> str:
    """``client:port>server:port`` of a connection key."""
    s, sp, d, dp = key
    return f"{hostport(addr_text(s), sp)}>{hostport(addr_text(d), dp)}"
