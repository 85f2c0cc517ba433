"""``ftpalg run`` on Linux: the rules, the status socket, the metrics endpoint, and either
one engine on the queue (``gateway.workers = 1``) or the workers' parent (``workers.py``),
until SIGINT/SIGTERM; then everything taken down in reverse."""

from __future__ import annotations

import contextlib
import functools
import logging
import socket
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Protocol

from ..config import Config
from . import metrics
from .engine import engine
from .metrics import MetricsView
from .nfqueue import QueueHandler
from .notify import ready
from .rules import HANDOVER, RuleError, StaticRules, keep_alive, queue_chains_present
from .status import Document, StatusServer
from .stop import SERVING, stopping
from .workers import WorkerSet

log = logging.getLogger("ftpalg")

LOCK_NAME = b"\0ftpalg-run"  # an abstract unix socket name: one per network namespace


class Served(Protocol):
    """What the status socket and the metrics endpoint read: one engine, or the workers."""

    def snapshot(self) -> Document: ...

    def metrics_view(self) -> MetricsView: ...


@contextlib.contextmanager
def single_instance() -> Iterator[None]:
    """One ``ftpalg run`` per network namespace: a second one would remove the first one's
    rules when it exits. The lock is a socket bound to an abstract name, which lives in the
    network namespace: no file to create (no root-owned directory needed), and the kernel
    frees it when the process ends, however it ends."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            sock.bind(LOCK_NAME)
        except OSError:
            raise RuleError("another ftpalg run is active in this network namespace "
                            "(it holds the abstract socket @ftpalg-run)") from None
        yield
    finally:
        sock.close()


def run(cfg: Config) -> int:
    """``ftpalg run``: serve under the namespace's lock; 0 after SIGINT/SIGTERM, whenever it
    comes, or 1 if set-up fails (said in the log)."""
    try:
        with single_instance():
            return serve(cfg)
    except (RuleError, OSError) as e:
        log.error("%s", e)
        return 1


def serve(cfg: Config) -> int:
    """Serve until SIGINT/SIGTERM; 0, also after a stop during start-up (each step finishes,
    the next is not taken, what was installed is removed), or 1 if set-up failed (said in the
    log). Raises RuleError if the rules are the admin's (``install_rules = false``) and
    missing."""
    gw = cfg.gateway
    ports = cfg.control_ports
    with stopping() as stop:
        if not gw.install_rules and not queue_chains_present(gw.workers, cfg.queue_selected):
            raise RuleError("install_rules = false (--no-rules): table inet ftpalg or its queue rule is missing"
                            + (f" (or was written for 1 worker, not {gw.workers}: `ftpalg rules PART --workers "
                               f"{gw.workers}` prints them)" if gw.workers > 1 else "")
                            + "; load ftpalg.nft and queue.iptables/queue.ip6tables (or ftpalg-queue.nft) from "
                            "deploy/ or /etc/ftpalg/rules/ first")
        rules = (StaticRules(ports, gw.queue_num, gw.queue_backend, gw.workers, cfg.queue_selected)
                 if gw.install_rules else None)
        touched = installed = False  # install() begun (remove() at the end), and done
        stops: list[Callable[[], None]] = []  # of the workers, and the status and metrics threads
        final: Callable[[], Counter[str]] | None = None  # the counters to log at the end
        loop: Callable[[], None]  # until SIGINT/SIGTERM
        try:
            with contextlib.ExitStack() as stack:
                stop.phase = "opening conntrack, the status socket and the metrics endpoint"
                served: Served
                if gw.workers > 1:
                    served = workers = WorkerSet(cfg)
                    stops.append(workers.stop)  # those started
                    final = workers.counters  # as each said when it stopped
                    loop = functools.partial(run_workers, workers)
                else:
                    served = eng = stack.enter_context(engine(cfg))
                    final = eng.alg.counters.copy  # read once the engine is down (its pinholes closed)
                    loop = functools.partial(QueueHandler(eng.alg, gw.queue_num, eng.latency, eng.verdicts,
                                                          eng.accounting, eng.watch, keep_alive).run, ready=ready)
                if cfg.status.socket:
                    st = StatusServer(cfg.status.socket, served.snapshot)
                    st.start()
                    stops.append(st.stop)
                if cfg.metrics.listen:
                    stops.append(metrics.serve(cfg.metrics.listen, served.metrics_view).shutdown)
                if rules is not None and not stop:
                    stop.phase = "installing the rules"
                    touched = True
                    backend = rules.install()  # a partial install is undone by remove() below all the same
                    installed = True
                    log.info("rules installed: queue via %s, control ports %s, queue %s",
                             backend, ",".join(map(str, sorted(ports))),
                             gw.queue_num if gw.workers == 1 else f"{gw.queue_num}-{gw.queue_num + gw.workers - 1}")
                n64 = cfg.nat64
                if n64.pool:
                    log.info("NAT64 (RFC 6384): control connections from %s are translated for IPv6 clients (%s)",
                             ", ".join(n64.pool), f"prefix {n64.prefix}" if n64.prefix else "no prefix: LPSV as it is")
                if not stop:
                    loop()  # binds the queue (or starts the workers): a stop meanwhile ends it at once
            if stop.in_startup:
                log.info("stopped during start-up on %s (it came while %s): nothing was served",
                         stop.signals[0], stop.during)
        except (RuleError, OSError) as e:
            log.error("%s", e)
            return 1
        finally:
            for s in stops:
                s()
            counters = final() if final is not None else Counter()
            if stop.for_restart and installed:
                keep_alive()  # the next ftpalg has HANDOVER seconds from now
                log.info("stopping for a restart (%s): rules and pinholes kept; control segments that need "
                         "ftpalg wait up to %d s for the next one, then pass unchanged", stop.signals[0], HANDOVER)
            elif rules is not None and touched:  # else the ruleset is as found: nothing to take back
                rules.remove()
                if installed:
                    log.info("rules removed")
            stats = " ".join(f"{k}={v}" for k, v in sorted(counters.items()))
            log.info("counters: %s", stats or "none")
    return 0


def run_workers(workers: WorkerSet) -> None:
    """Start the workers; supervise them until SIGINT/SIGTERM."""
    with stopping() as stop:
        stop.phase = "starting the workers"
        if not workers.start(stop):
            return
        stop.phase = SERVING
        ready()
        workers.supervise(stop)
        if stop:
            log.info("stopping on %s", stop.signals[0])
