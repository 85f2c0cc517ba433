"""What may open a pinhole. Pure decisions, no I/O.

Rules (this release, clients behind NAT, active mode):
- the address in PORT/EPRT must be the client's own (inside) address, as the kernel's
  nf_conntrack_ftp requires; anything else is an FTP bounce (RFC 2577) and opens nothing;
- the pinhole's source is pinned to the control connection's server address;
- one live pinhole per control connection: a new PORT/EPRT replaces the old one;
- a public port already promised to another pinhole for the same server is not reused:
  a random free port above it is taken and the rewritten command names it (as nf_nat_ftp
  does).
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from .ftp import HostPort

FIRST_DYNAMIC = 1024
PORT_TRIES = 128  # as nf_nat_exp_find_port


def refuse_reason(hp: HostPort, client_addr: str, client_family: int) -> str | None:
    """Why ``hp`` sent by ``client_addr`` must not open a pinhole, or None."""
    if hp.family != client_family:
        return "address family differs from the control connection"
    if hp.addr != client_addr:
        return "address is not the client's own (FTP bounce)"
    return None


def candidate_ports(want: int, rng: random.Random) -> Iterator[int]:
    """``want`` first, then random ports between it (at least 1024) and 65535, as the
    kernel's nf_nat_exp_find_port does since it stopped counting upwards: the replacement
    port of a busy one is not predictable."""
    yield want
    lo = max(want, FIRST_DYNAMIC)
    for _ in range(PORT_TRIES - 1):
        yield rng.randint(lo, 65535)
