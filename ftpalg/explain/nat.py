"""Inferring the NAT mapping: the view a gateway's conntrack would report of each control
connection, and where the capture was taken.

The capture may be taken on either side of a gateway (or at a client or server). For each
FTP control connection (port 21 or ``--control-port``) the NAT mapping a gateway's
conntrack would report is inferred from the capture:

- client private, server public: taken on the inside of a client-NAT gateway; its public
  address is ``--public`` or unknown (shown as ``<public>``);
- a PORT/EPRT/LPRT naming a private address while the client appears public: the client is
  behind NAT, taken outside it (the client's real address is the announced one);
- server private, client public: taken on the inside of a server-DNAT gateway (its public
  address: ``--public`` or unknown);
- a 227/228 naming a private address while the server appears public: the server is behind
  a DNAT gateway, taken outside it (the server's real address is the announced one).

An unknown public address goes through the core as a placeholder (``PLACEHOLDER``) and is
shown as ``<public>`` (``show``).
"""

from __future__ import annotations

import ipaddress

from ..core import ftp
from ..core.addr import hostport
from ..core.policy import Mapping
from .connections import Session

_PRIVATE = [ipaddress.ip_network(n) for n in (
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "169.254.0.0/16", "fc00::/7", "fe80::/10")]
PLACEHOLDER = {4: "0.0.0.0", 6: "100::1"}  # stands for a public address the capture does not show
UNKNOWN = "<public>"


def is_private(addr: str) -> bool:
    """RFC 1918, shared (RFC 6598), link-local and ULA addresses: not reachable from the
    internet. The documentation ranges (the lab's "public" networks) count as public."""
    ip = ipaddress.ip_address(addr)
    return any(ip in n for n in _PRIVATE if n.version == ip.version)


def show(text: str, s: Session) -> str:
    """``text`` with the placeholder of an unknown public address shown as <public>."""
    if not s.public_unknown:
        return text
    for fam, ph in PLACEHOLDER.items():
        text = text.replace(ph, UNKNOWN)
        if fam == 4:
            text = text.replace("0,0,0,0", UNKNOWN)
    return text


def _announced(s: Session) -> tuple[list[str], list[str]]:
    """Addresses the session's PORT/EPRT/LPRT and 227/228 lines name."""
    active, passive = [], []
    for ln in s.lines:
        try:
            if ln.d == 0:
                hp = ftp.parse_hostport(ln.text)
                if hp is not None and hp.addr:
                    active.append(hp.addr)
            else:
                r = ftp.parse_reply(ln.text)
                if r is not None and r.code in (227, 228):
                    hp = ftp.parse_passive_reply(ln.text, r.code)
                    if hp is not None and hp.addr:
                        passive.append(hp.addr)
        except ftp.ParseError:
            continue
    return active, passive


def _private_behind(seen: str, announced: list[str], fam: int) -> str | None:
    """The first private address of family ``fam`` among ``announced`` other than the
    address ``seen`` in the capture: the real one behind a gateway."""
    return next((a for a in announced if a != seen and is_private(a) and (6 if ":" in a else 4) == fam), None)


def infer_mapping(s: Session, public: str | None) -> None:
    """The gateway's view of the control connection (``s.mapping``) and where the capture
    was taken (``s.where``), from its addresses and what it announces."""
    c, sv = s.client, s.server
    fam = 6 if ":" in c else 4
    if public is not None and (6 if ":" in public else 4) != fam:
        public = None
    active, passive = _announced(s)
    gateway = public or PLACEHOLDER[fam]  # its public address, as the core is told it
    told = public or "unknown, give it with --public ADDR"
    client, client_seen, server, pub = c, c, sv, sv
    where = []
    if is_private(c) and not is_private(sv):
        client_seen = gateway
        s.public_unknown = public is None
        where.append(f"the client {c} is private and the server {sv} public: captured on the client's side of a "
                     f"NAT gateway (its public address: {told})")
    elif not is_private(c) and (inner := _private_behind(c, active, fam)):
        client = inner
        where.append(f"the client appears as {c} but announces {client}: it is behind a NAT gateway, "
                     "captured outside it")
    if is_private(sv) and not is_private(c):
        pub = gateway
        s.public_unknown = s.public_unknown or public is None
        where.append(f"the server {sv} is private and the client {c} public: captured on the server's side of a "
                     f"DNAT gateway (its public address: {told})")
    elif not is_private(sv) and (inner := _private_behind(sv, passive, fam)):
        server = inner
        where.append(f"the client connects to {sv} but the server announces {server}: the server is behind a "
                     f"DNAT gateway ({hostport(sv, s.sport)} -> {hostport(server, s.sport)}), captured outside it")
    if not where:
        where.append("no address translation visible: client and server addresses as captured")
    s.mapping = Mapping(client, pub, server, client_seen)
    s.where = "; ".join(where)
