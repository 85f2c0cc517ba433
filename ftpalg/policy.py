"""What may open a pinhole. Pure decisions, no I/O.

Rules (this release, clients behind NAT, active mode):
- the address in PORT/EPRT must be the client's own (inside) address, as the kernel's
  nf_conntrack_ftp requires; anything else is an FTP bounce (RFC 2577) and opens nothing;
- the pinhole's source is pinned to the control connection's server address;
- one live pinhole per control connection: a new PORT/EPRT replaces the old one;
- a public port already promised to another pinhole for the same server is not reused:
  the next free port is taken and the rewritten command names it (as nf_nat_ftp does).
"""

from __future__ import annotations

from collections.abc import Iterator

from .ftp import HostPort

FIRST_DYNAMIC = 1024
PORT_TRIES = 256


def refuse_reason(hp: HostPort, client_addr: str, client_family: int) -> str | None:
    """Why ``hp`` sent by ``client_addr`` must not open a pinhole, or None."""
    if hp.family != client_family:
        return "address family differs from the control connection"
    if hp.addr != client_addr:
        return "address is not the client's own (FTP bounce)"
    return None


def candidate_ports(want: int) -> Iterator[int]:
    """``want`` first, then the following ports, wrapping within 1024..65535."""
    yield want
    span = 65536 - FIRST_DYNAMIC
    base = max(want, FIRST_DYNAMIC) - FIRST_DYNAMIC
    for i in range(1, PORT_TRIES):
        yield FIRST_DYNAMIC + (base + i) % span
