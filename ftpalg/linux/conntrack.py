"""``LinuxKernel`` (kernel.py) as today's core takes it: a ``NatLookup`` (``Conntrack``) and
a ``PinholeBackend`` (``ExpectationPinholes``), both thin. They go when the core takes the
kernel port itself (``Alg(kernel, ...)``)."""

from __future__ import annotations

from ..core.seqadj import KernelAdj
from ..core.table import FlowKey, Pinhole
from .kernel import LinuxKernel


class Conntrack:
    """NatLookup: reply tuples and kernel sequence adjustment, with both short cuts."""

    def __init__(self, kernel: LinuxKernel) -> None:
        self.kernel = kernel

    def mapping(self, key: FlowKey) -> tuple[FlowKey, bool] | None:
        return self.kernel.mapping(key)

    def reply_tuple(self, key: FlowKey) -> FlowKey | None:
        found = self.kernel.mapping(key)
        return None if found is None else found[0]

    def seq_adjust(self, key: FlowKey, direction: int, seq: int, delta: int) -> KernelAdj:
        return self.kernel.seq_adjust(key, direction, seq, delta, None)

    def seq_adjust_from(self, key: FlowKey, direction: int, seq: int, delta: int, known: KernelAdj) -> KernelAdj:
        return self.kernel.seq_adjust(key, direction, seq, delta, known)


class ExpectationPinholes:
    """PinholeBackend: one conntrack expectation per pinhole."""

    def __init__(self, kernel: LinuxKernel) -> None:
        self.kernel = kernel

    def open(self, ph: Pinhole) -> None:
        self.kernel.expect(ph)

    def close(self, ph: Pinhole) -> None:
        self.kernel.withdraw(ph, used=False)

    def close_used(self, ph: Pinhole) -> None:
        self.kernel.withdraw(ph, used=True)
