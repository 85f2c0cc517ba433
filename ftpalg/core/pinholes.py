"""The pinhole book: every pinhole promised to the kernel, counted per FTP client, under
the caps of ``Limits``.

A pinhole is booked under (peer, public address, public port): two live pinholes never
share that, so the port an announcement is rewritten to is free among ours (the kernel
answers for the rest: ``PinholeBusy``). At the total cap (``--max-pinholes``) a client
holding few may take the place of the oldest pinhole of the client holding the most
(fair-share pre-emption), so clients that open many cannot starve one that opens few; a
client at ``--max-pinholes-per-client`` opens nothing more.
"""

from __future__ import annotations

from collections import Counter

from .addr import addr_text
from .kernel import Pinhole
from .policy import Limits


class PinholeBook:
    __slots__ = ("limits", "promised", "per_client", "next_id", "ids")

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.promised: dict[tuple[str, str, int], Pinhole] = {}  # (peer, public, port)
        self.per_client: Counter[str] = Counter()  # live pinholes per FTP client address
        self.next_id = 1
        self.ids: dict[int, Pinhole] = {}

    def __len__(self) -> int:
        return len(self.promised)

    def taken(self, peer: str, public: str, port: int) -> bool:
        return (peer, public, port) in self.promised

    def full(self) -> bool:
        return len(self.promised) >= self.limits.max_pinholes

    def client_full(self, client: str) -> bool:
        return self.per_client[client] >= self.limits.max_pinholes_per_client

    def victim(self, client: str) -> Pinhole | None:
        """At the total cap: the pinhole to close to make room for ``client`` — the oldest
        of the client that holds the most, if it holds more than ``client`` would with one
        more — or None (no room is made)."""
        top, n = max(self.per_client.items(), key=lambda kv: kv[1], default=("", 0))
        if n <= self.per_client[client] + 1:
            return None
        return min((ph for ph in self.promised.values() if addr_text(ph.master[0]) == top),
                   key=lambda ph: ph.expires, default=None)

    def book(self, ph: Pinhole, client: str) -> None:
        """``ph`` is open for ``client``."""
        self.next_id = max(self.next_id, ph.id + 1)
        self.promised[(ph.peer, ph.public, ph.public_port)] = ph
        self.ids[ph.id] = ph
        self.per_client[client] += 1

    def unbook(self, ph: Pinhole) -> None:
        self.promised.pop((ph.peer, ph.public, ph.public_port), None)
        self.ids.pop(ph.id, None)
        client = addr_text(ph.master[0])
        self.per_client[client] -= 1
        if self.per_client[client] <= 0:
            del self.per_client[client]

    def by_id(self, pinhole_id: int) -> Pinhole | None:
        return self.ids.get(pinhole_id)

    def expired(self, now: float) -> list[Pinhole]:
        return [ph for ph in self.promised.values() if ph.expires <= now]
