"""NAT64 (RFC 6384): which control connections crossed an IPv6-to-IPv4 translator, and what
ftpalg keeps for each of them. Pure values; the grammar is in ``ftp.py``, the decisions in
``session.py`` and ``actions.py``.

ftpalg sees a translated control connection on the translator's IPv4 side: an IPv6-only
client's packets leave the translator (Tayga, a TUN device on the gateway) with an address
of the translator's dynamic pool as their source. A connection whose client address is in
a configured pool (``[nat64] pool``) is a translated one; every other connection is
followed as before. The translator's IPv6 prefix (``[nat64] prefix``, RFC 6052) is needed
only to name the server's IPv6 address in a 228 (LPSV) and to recognise an EPRT naming an
IPv4-embedded address (another IPv4 host, not the client).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from .addr import addr_text

# RFC 6052 §2.2: the prefix lengths an IPv4 address can be embedded after
PREFIX_LENGTHS = (32, 40, 48, 56, 64, 96)


@dataclass(frozen=True, slots=True)
class Nat64:
    """The translator as configured: its IPv4 pools and, if given, its IPv6 prefix."""

    pools: tuple[ipaddress.IPv4Network, ...] = ()
    prefix: ipaddress.IPv6Network | None = None

    @classmethod
    def of(cls, pools: tuple[str, ...] | list[str], prefix: str = "") -> Nat64 | None:
        """From the configuration's texts; None when no pool is configured (NAT64 off).
        Raises ValueError for a text that is not a pool or a prefix RFC 6052 allows."""
        if not pools:
            return None
        nets = tuple(ipaddress.IPv4Network(p, strict=False) for p in pools)
        pfx = ipaddress.IPv6Network(prefix, strict=False) if prefix else None
        if pfx is not None and pfx.prefixlen not in PREFIX_LENGTHS:
            raise ValueError(f"prefix length /{pfx.prefixlen} is not one of RFC 6052's "
                             f"({', '.join(f'/{n}' for n in PREFIX_LENGTHS)})")
        return cls(nets, pfx)

    def translated(self, packed: bytes) -> bool:
        """Whether a connection from the packed address ``packed`` crossed the translator."""
        if len(packed) != 4:
            return False
        a = ipaddress.IPv4Address(packed)
        return any(a in net for net in self.pools)

    def state(self, packed: bytes) -> Xlat | None:
        """A new connection's NAT64 state, or None when it is not a translated one."""
        if not self.translated(packed):
            return None
        return Xlat(addr_text(packed), self.prefix)


def embed(prefix: ipaddress.IPv6Network, v4: str) -> str:
    """The IPv4-embedded IPv6 address of ``v4`` under ``prefix`` (RFC 6052 §2.2: bits 64..71
    stay zero; a /96 prefix takes the address in its last 32 bits)."""
    four = ipaddress.IPv4Address(v4).packed
    head = prefix.network_address.packed[: prefix.prefixlen // 8]
    out = bytearray(head)
    for b in four:
        if len(out) == 8:  # the u octet
            out.append(0)
        out.append(b)
    out += bytes(16 - len(out))
    return str(ipaddress.IPv6Address(bytes(out)))


def embedded(prefix: ipaddress.IPv6Network | None, v6: str) -> bool:
    """Whether ``v6`` lies in the translator's prefix (stands for an IPv4 host)."""
    return prefix is not None and ipaddress.IPv6Address(v6) in prefix


class Kind:
    """What a translated command becomes toward the server (``Sub.kind``)."""

    PASSIVE = "passive"  # EPSV / LPSV -> PASV: the 227 goes back as 229 / 228
    ANSWER = "answer"  # answered by ftpalg: the server got a NOOP, its reply is replaced


@dataclass(slots=True)
class Sub:
    """One translated command, until its reply: what the server got instead and why."""

    kind: str
    verb: bytes  # the client's verb (EPSV, ALGS, ...)
    sent: bytes  # the verb the server got (PASV, PORT, NOOP)
    answer: bytes = b""  # ANSWER: ftpalg's reply, without the line end
    reply_form: str = ""  # PASSIVE: "229" or "228"
    enabled: bool = True  # whether translation was enabled before it (ALGS changes it)


@dataclass(slots=True)
class Xlat:
    """The NAT64 state of one translated control connection."""

    client: str  # its client's address on the IPv4 side (a pool address)
    prefix: ipaddress.IPv6Network | None = None
    enabled: bool = True  # ALGS ENABLE64 / DISABLE64 (RFC 6384)
    client6: str = ""  # the IPv6 address the client named in an EPRT |2| / LPRT 6 (its claim)
    subs: dict[int, Sub] = field(default_factory=dict)  # by command index, until answered
    translated: int = 0  # lines translated on this connection

    @property
    def owed(self) -> bool:
        """Whether a reply ftpalg must replace is still to come."""
        return any(s.kind == Kind.ANSWER for s in self.subs.values())

    def fresh(self) -> Xlat:
        """The state kept across a resync: what was asked of it, not what it waited for."""
        return Xlat(self.client, self.prefix, self.enabled, self.client6, {}, self.translated)

    def status(self) -> bytes:
        """ALGS STATUS64's answer word (RFC 6384)."""
        return b"EPSVEPRT" if self.enabled else b"NONE"
