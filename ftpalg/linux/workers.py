"""Several worker processes (``gateway.workers``), each bound to its own NFQUEUE.

The queue rule deals control connections out by conntrack's original source port (see
``rules.stripes``): both directions of a connection carry the same conntrack entry, so they
reach the same worker whatever NAT did to the addresses, and each worker keeps the whole
state of its connections (streams, sessions, pinholes) to itself; nothing is shared per
packet. Pinholes are kernel expectations, one namespace for all workers: two workers asking
for the same one get EEXIST/EBUSY, which the core already treats as a busy port. The caps
(``--max-flows``, ``--max-pinholes``, ``--max-held-bytes``) are split evenly between the
workers; ``--max-pinholes-per-client`` holds per worker (a client whose control connections
land on several workers may get up to that many on each).

The parent process installs and removes the rules, serves ``ftpalg status`` and the metrics
(asking each worker over a pipe, between packets), and supervises: a worker that dies is
restarted (its queue passes packets unchanged meanwhile, ``--queue-bypass``); one that dies
again and again stops the whole run. Workers are started with the ``spawn`` method (a fresh
interpreter: no thread or lock of the parent's is copied) and stop when the parent's end of
their pipe closes, so none outlives the parent, however it ends.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from multiprocessing import resource_tracker
from multiprocessing.connection import Connection
from multiprocessing.context import SpawnProcess

from .. import logs
from ..config import Config
from ..core.policy import Limits
from .engine import Engine, engine
from .metrics import MetricsView
from .rules import keep_alive
from .status import Document
from .stop import RESTART_SIGNAL, Stop, restarting, signals_held, stopping, unblock

log = logging.getLogger("ftpalg")

START_TIMEOUT = 15.0  # seconds for a worker to bind its queue
ASK_TIMEOUT = 2.0  # seconds a worker may take to answer a status request
STOP_TIMEOUT = 10.0  # seconds a worker may take to stop (pinholes deleted) before it is killed
RESTARTS = 5  # worker deaths tolerated within RESTART_WINDOW seconds
RESTART_WINDOW = 60.0


def worker_limits(cfg: Config, workers: int) -> Limits:
    """One worker's share of the caps (each at least 1)."""
    lim = cfg.limits()
    return dataclasses.replace(lim, max_flows=max(1, lim.max_flows // workers),
                               max_pinholes=max(1, lim.max_pinholes // workers),
                               max_held_bytes=max(1, lim.max_held_bytes // workers))


@dataclass(frozen=True, slots=True)
class WorkerState:
    """A worker's answer to the parent's request: its ``ftpalg status`` document and its
    metrics (the parent merges the one and sums the other over the workers)."""

    status: Document
    metrics: MetricsView


def state(eng: Engine) -> WorkerState:
    return WorkerState(eng.snapshot(), eng.metrics_view())


def worker_main(cfg: Config, index: int, conn: Connection) -> None:
    """A worker: the same engine as a single-process run, on queue ``queue_num + index``;
    answers the parent's requests on ``conn`` between packets."""
    with stopping():  # SIGINT/SIGTERM held since the parent spawned us: recorded from here
        unblock()
        _worker(cfg, index, conn)


def _worker(cfg: Config, index: int, conn: Connection) -> None:
    """``worker_main`` once its handler is in place."""
    logs.setup(cfg.log.level, f"w{index} ")
    from .nfqueue import QueueHandler

    workers = cfg.gateway.workers
    queue = cfg.gateway.queue_num + index
    try:
        with engine(cfg, worker_limits(cfg, workers)) as eng:
            def answer() -> bool:
                try:
                    req = conn.recv()
                    if req == "state":
                        conn.send(state(eng))
                except (EOFError, OSError):
                    log.info("parent gone: stopping")
                    return False
                return True

            handler = QueueHandler(eng.alg, queue, eng.latency, eng.verdicts, eng.accounting, eng.watch)
            handler.run(ready=lambda: conn.send(("ready", queue)), extra=[(conn, answer)],
                        bound_message=f"worker {index} bound to queue {queue}")
    except OSError as e:  # the queue or netlink socket: said once, the parent reports the exit
        log.error("worker %d (queue %d): %s", index, queue, e)
        sys.exit(1)
    with contextlib.suppress(OSError):
        conn.send(("final", dict(eng.alg.counters)))


@dataclass
class _Worker:
    index: int
    proc: SpawnProcess
    conn: Connection  # the parent's end of the pipe
    final: dict[str, int] = dataclasses.field(default_factory=dict)  # its counters when it stopped


class WorkerSet:
    """The parent's side: start, ask, supervise and stop the workers."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.count = cfg.gateway.workers
        self.ctx = multiprocessing.get_context("spawn")
        self.workers: list[_Worker] = []  # by index, once started
        self.lock = threading.Lock()  # one request at a time on the pipes (status and metrics threads)
        self.deaths: list[float] = []

    # ---- life cycle ------------------------------------------------------------------------
    def start(self, stop: Stop) -> bool:
        """Start the workers; False if ``stop`` came first (those started are stopped by
        ``stop()``, as after a run)."""
        for i in range(self.count):
            self.workers.append(self._spawn(i))
        for w in self.workers:
            if not self._wait_ready(w, stop):
                return False
        q = self.cfg.gateway.queue_num
        log.info("bound to NFQUEUE %d-%d (%d workers, pids %s)", q, q + self.count - 1, self.count,
                 ",".join(str(w.proc.pid) for w in self.workers))
        return True

    def _spawn(self, index: int) -> _Worker:
        parent, child = self.ctx.Pipe()
        proc = self.ctx.Process(target=worker_main, args=(self.cfg, index, child), name=f"ftpalg-w{index}",
                                daemon=False)
        # The first spawn starts multiprocessing's resource tracker, and unblocks SIGINT/SIGTERM
        # in this thread once it has (its own guard, bpo-33613): started beforehand, it leaves
        # the worker's block alone.
        resource_tracker.ensure_running()
        with signals_held():  # until the worker's own handler is in place (worker_main)
            proc.start()
        child.close()
        return _Worker(index, proc, parent)

    def _wait_ready(self, w: _Worker, stop: Stop) -> bool:
        """Until the worker is bound (True) or ``stop`` comes (False)."""
        ready = multiprocessing.connection.wait([w.conn, stop.wake], START_TIMEOUT)
        if stop:
            return False
        if not ready:
            raise OSError(f"worker {w.index} did not bind queue {self.cfg.gateway.queue_num + w.index} "
                          f"within {START_TIMEOUT:g} s")
        try:
            msg = w.conn.recv()
        except EOFError:
            w.proc.join(1)
            raise OSError(f"worker {w.index} exited while starting (exit code {w.proc.exitcode}): "
                          "see its messages above") from None
        if msg[0] != "ready":
            raise OSError(f"worker {w.index}: unexpected message {msg[0]!r}")
        return True

    def supervise(self, stop: Stop) -> None:
        """Until ``stop`` comes: restart workers that die, or raise OSError when they keep
        dying."""
        while not stop:
            keep_alive()  # the workers' queues stay without bypass while this parent lives (rules.py)
            sentinels = {w.proc.sentinel: w for w in self.workers}
            ready = multiprocessing.connection.wait([*sentinels, stop.wake], timeout=1.0)
            for s in ready:
                w = sentinels.get(s) if isinstance(s, int) else None
                if w is None or stop:
                    continue
                w.proc.join()
                now = time.monotonic()
                self.deaths = [t for t in self.deaths if now - t < RESTART_WINDOW] + [now]
                if len(self.deaths) > RESTARTS:
                    raise OSError(f"workers died {len(self.deaths)} times within {RESTART_WINDOW:g} s "
                                  f"(worker {w.index} last, exit code {w.proc.exitcode}): giving up")
                log.error("worker %d (pid %d) exited with code %s: restarting it; its queue %d held segments back "
                          "(dropped: TCP resends them) meanwhile", w.index, w.proc.pid, w.proc.exitcode,
                          self.cfg.gateway.queue_num + w.index)
                with self.lock:
                    w.conn.close()
                    self.workers[w.index] = self._spawn(w.index)
                    self._wait_ready(self.workers[w.index], stop)

    def stop(self) -> None:
        """SIGTERM to every worker (each releases what it holds and deletes its pinholes; for
        a restart SIGUSR1: the pinholes stay for the next run), then wait; kill what does not
        stop. Keeps their final counters."""
        sig = RESTART_SIGNAL if restarting() else signal.SIGTERM
        with self.lock:
            for w in self.workers:
                if w.proc.is_alive() and w.proc.pid is not None:
                    os.kill(w.proc.pid, sig)
            deadline = time.monotonic() + STOP_TIMEOUT
            for w in self.workers:
                while not w.conn.closed:
                    left = deadline - time.monotonic()
                    if left <= 0 or not w.conn.poll(left):
                        break
                    try:
                        msg = w.conn.recv()
                    except (EOFError, OSError):
                        break
                    if isinstance(msg, tuple) and msg[0] == "final":
                        w.final = msg[1]
                        break
                w.proc.join(max(0.1, deadline - time.monotonic()))
                if w.proc.is_alive():
                    log.error("worker %d (pid %d) did not stop within %g s: killed", w.index, w.proc.pid,
                              STOP_TIMEOUT)
                    w.proc.kill()
                    w.proc.join(5)
                w.conn.close()

    def counters(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for w in self.workers:
            total.update(w.final)
        return total

    # ---- status and metrics ------------------------------------------------------------------
    def states(self) -> list[WorkerState | None]:
        """Each worker's state (None: it did not answer in time)."""
        out: list[WorkerState | None] = [None] * len(self.workers)
        with self.lock:
            asked = []
            for i, w in enumerate(self.workers):  # all at once: they answer in parallel
                with contextlib.suppress(OSError):
                    w.conn.send("state")
                    asked.append(i)
            for i in asked:
                w = self.workers[i]
                try:
                    while w.conn.poll(ASK_TIMEOUT):
                        msg = w.conn.recv()
                        if isinstance(msg, WorkerState):
                            out[i] = msg
                            break
                except (EOFError, OSError):
                    pass
        return out

    def snapshot(self) -> Document:
        """``ftpalg status``'s document, merged over the workers."""
        merged: Document = {"flows": [], "pinholes": [], "counters": Counter(), "tracked": 0, "held_bytes": 0,
                                  "workers": []}
        for w, state in zip(self.workers, self.states(), strict=True):
            st = None if state is None else state.status
            c = st["counters"] if st is not None else {}
            merged["workers"].append({"index": w.index, "pid": w.proc.pid, "answered": st is not None,
                                      "queue": self.cfg.gateway.queue_num + w.index,
                                      "packets": c.get("packets", 0), "flows": c.get("flows", 0)})
            if st is None:
                continue
            for key in ("flows", "pinholes"):
                merged[key] += [dict(x, worker=w.index) for x in st[key]]
            merged["counters"].update(st["counters"])
            merged["tracked"] += st["tracked"]
            merged["held_bytes"] += st["held_bytes"]
        merged["counters"] = dict(merged["counters"])
        return merged

    def metrics_view(self) -> MetricsView:
        """The workers' metrics, summed (those that did not answer count nothing)."""
        return MetricsView.total(st.metrics for st in self.states() if st is not None)
