"""What an announced address may open, and what the pinhole looks like. Pure decisions.

A control connection is seen at the gateway with two tuples (conntrack's view):
original ``client:cport -> public:pport`` (as the client sent it) and reply
``server:sport -> client_seen:cport'`` (as the server answers it). Any DNAT of the control
connection makes ``server`` differ from ``public``; any SNAT makes ``client_seen`` differ from
``client``. The data connection must get the same translations, mirrored, as the kernel's
nf_nat_follow_master gives an expected connection:

- active mode (PORT/EPRT/LPRT naming ``client``:p): the server connects from ``server``
  (any port) to ``client_seen``:p'. It is DNATed to ``client``:p and, when the control
  connection was DNATed, SNATed to ``public`` (the address the client knows). The command
  is rewritten to ``client_seen``:p'.
- passive mode (227/228 naming ``server`` or ``public``, 229 naming only a port q): the client
  connects from ``client`` (any port) to ``public``:q'. It is DNATed to ``server``:q and, when
  the control connection was SNATed, SNATed to ``client_seen``. The reply is rewritten to
  ``public``:q'.

Rules:
- an active announcement must name the client's own address (anything else is an FTP
  bounce, RFC 2577; as nf_conntrack_ftp); a passive one must name the server's real
  address or the public address the client used (a server configured with the gateway's
  address, e.g. vsftpd ``pasv_address``); a third address opens nothing;
- the pinhole's source is pinned to the real peer of the control connection;
- the announced port is at least ``Limits.min_port`` (1024): a PORT naming the client's own
  port 25 or a 227 naming the server's port 22 would open a path to a service, not to a
  data connection (libalias and OpenBSD's ftp-proxy refuse these too; nf_conntrack_ftp
  does not);
- a public port already promised to another pinhole for the same peer is not reused: a
  random free port above it is taken and the rewritten line names it (as nf_nat_ftp does).
"""

from __future__ import annotations

import ipaddress
import random
import socket
from collections.abc import Iterator
from dataclasses import dataclass

from .ftp import HostPort

FIRST_DYNAMIC = 1024
PORT_TRIES = 128  # as nf_nat_exp_find_port


def addr_text(packed: bytes) -> str:
    if len(packed) == 4:  # the same text as ipaddress gives, in a tenth of the time
        return socket.inet_ntop(socket.AF_INET, packed)
    return str(ipaddress.ip_address(packed))


@dataclass(frozen=True, slots=True)
class Mapping:
    """The NAT mapping of a control connection, from its two conntrack tuples."""

    client: str
    public: str
    server: str
    client_seen: str

    @property
    def family(self) -> int:
        return 6 if ":" in self.client else 4

    @classmethod
    def from_tuples(cls, orig: tuple[bytes, int, bytes, int], reply: tuple[bytes, int, bytes, int]) -> Mapping:
        return cls(addr_text(orig[0]), addr_text(orig[2]), addr_text(reply[0]), addr_text(reply[2]))


@dataclass(frozen=True, slots=True)
class Plan:
    """A pinhole to open, before its public port is chosen."""

    peer: str  # who may connect (any source port)
    public: str  # the address it connects to
    want_port: int  # the announced port: public port if free
    inside: str  # where the connection is sent (== public: no DNAT)
    inside_port: int
    snat: str | None  # source address it leaves with (None: unchanged)
    announce_addr: str | None  # the address the rewritten line names (None: 229, port only)


@dataclass(frozen=True, slots=True)
class Limits:
    """The policy's switches and caps (``ftpalg run`` options of the same names). What
    happens at each cap: the control connection passes unchanged (fail-open), the
    announcement opens nothing and is not rewritten, the reason is counted and logged."""

    min_port: int = FIRST_DYNAMIC  # no pinhole to a port below this (--min-port 1: any)
    max_flows: int = 16384  # control connections tracked at once (then: idle ones evicted)
    max_pinholes: int = 4096  # live pinholes in total
    max_pinholes_per_client: int = 64  # live pinholes of one FTP client address
    max_held_bytes: int = 1 << 20  # bytes of segments held back (partial lines, out of order)

    def __post_init__(self) -> None:
        if not 1 <= self.min_port <= 65535:
            raise ValueError(f"min_port {self.min_port} not in 1..65535")
        for name in ("max_flows", "max_pinholes", "max_pinholes_per_client", "max_held_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")


DEFAULT_LIMITS = Limits()


def refuse_reason(hp: HostPort, m: Mapping, limits: Limits = DEFAULT_LIMITS) -> str | None:
    """Why ``hp`` must not open a pinhole on the connection mapped by ``m``, or None."""
    if hp.addr is not None:
        why = _address_refused(hp, m)
        if why:
            return why
    if hp.port < limits.min_port:
        return f"port {hp.port} is below {limits.min_port} (--min-port): a service port, not a data port"
    return None


def _address_refused(hp: HostPort, m: Mapping) -> str | None:
    if hp.family != m.family:
        return "address family differs from the control connection"
    if hp.form.is_reply:
        if hp.addr not in (m.server, m.public):
            return "address is neither the server's nor the public address of the control connection"
        return None
    if hp.addr != m.client:
        return "address is not the client's own (FTP bounce)"
    return None


def plan(hp: HostPort, m: Mapping) -> Plan:
    """The pinhole for an announcement that ``refuse_reason`` accepted."""
    if hp.form.is_reply:
        return Plan(peer=m.client, public=m.public, want_port=hp.port, inside=m.server, inside_port=hp.port,
                    snat=m.client_seen if m.client_seen != m.client else None,
                    announce_addr=None if hp.addr is None else m.public)
    return Plan(peer=m.server, public=m.client_seen, want_port=hp.port, inside=m.client, inside_port=hp.port,
                snat=m.public if m.public != m.server else None, announce_addr=m.client_seen)


def candidate_ports(want: int, rng: random.Random) -> Iterator[int]:
    """``want`` first, then random ports between it (at least 1024) and 65535, as the
    kernel's nf_nat_exp_find_port does since it stopped counting upwards: the replacement
    port of a busy one is not predictable."""
    yield want
    lo = max(want, FIRST_DYNAMIC)
    for _ in range(PORT_TRIES - 1):
        yield rng.randint(lo, 65535)
