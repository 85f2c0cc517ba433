"""The static rules ftpalg needs, installed by ``ftpalg run`` and removed when it exits
(``--no-rules`` leaves them to the admin, who loads the same text from deploy/):

- ``table inet ftpalg`` (nft, IPv4 and IPv6):
  - a ``ct helper`` object of the kernel's built-in ``sane`` helper, attached to every new
    connection to a control port at prerouting priority -175: after conntrack (-200), before
    NAT (-100). A connection with a helper may carry kernel expectations (ftpalg's pinholes)
    and gets a sequence-adjustment extension when its NAT is set up (the kernel then applies
    ftpalg's corrections). ``sane``'s own parser never matches FTP text.
  - two empty nat chains, so that the kernel sets up NAT (a null binding) for connections of
    both families even where the admin has no NAT (an IPv6 gateway): that is where the
    sequence-adjustment extension is added.
  - where the kernel has nft's ``queue`` statement: the queue rule (else see below).
- the queue rule: packets of both directions of control connections (conntrack's original
  destination port) go to NFQUEUE at mangle PREROUTING (-150), i.e. after conntrack and the
  helper, before NAT. iptables'
  NFQUEUE target where nft has no ``queue`` (this kernel); ``bypass``: while no process is
  bound, packets pass unchanged (fail-open; the kernel keeps applying corrections).

No rule of ftpalg's sits in the admin's filter or nat chains: data connections are RELATED
(expectations, see kernel.py), so the admin's ``established,related accept`` admits them.

Removal leaves the ruleset as found: our table, our chain and its jump, and the tables
iptables-nft created on demand for them (remembered in our table's comment, so a restart
after a crash still knows).
"""

from __future__ import annotations

import errno
import logging
import shutil
import socket
import subprocess
from collections.abc import Iterable

from . import nftnl
from .stop import signals_held

log = logging.getLogger("ftpalg")

CHAIN_QUEUE = "FTPALG-QUEUE"
CHAIN_CONTROL = "FTPALG-CONTROL"
CHAIN_WORKERS = "FTPALG-WORKERS"
CHAIN_SELECT = "FTPALG-SELECT"
CHAIN_VERDICT = "FTPALG-VERDICT"
NFT_TABLE = "ftpalg"
HELPER = "sane"  # the kernel helper attached to control connections
HELPER_OBJ = "ftpalg-sane"
FAMILIES = (4, 6)
# (table, hook chain, our chain) of every jump this and earlier releases inserted
JUMPS = (("mangle", "PREROUTING", CHAIN_QUEUE),)
SUBCHAINS = (("mangle", CHAIN_CONTROL), ("mangle", CHAIN_WORKERS), ("mangle", CHAIN_SELECT),
             ("mangle", CHAIN_VERDICT))  # jumped to only from our own chains
OLD_JUMPS = (("raw", "PREROUTING", "FTPALG-QUEUE"), ("nat", "PREROUTING", "FTPALG-PINHOLES"),
             ("nat", "POSTROUTING", "FTPALG-SNAT"), ("filter", "FORWARD", "FTPALG-PINHOLES"))
NFT_FAMILY = {4: "ip", 6: "ip6"}
SYN_RATE = 1000  # SYNs (and RSTs) per second queued at most; beyond, they pass untouched
# Several workers: each control connection is given to one when conntrack creates its entry,
# by bits 1.. of the client's source port (bit 0 is not random: Linux prefers even ports for
# connect()), and the choice is written into the entry as conntrack labels (the worker's index
# in binary, labels LABEL_BASE...): both directions then carry it, whatever NAT did to the
# addresses and ports, and the queue rule picks the worker's queue by it. Ports are dealt out
# in buckets: as many as workers when that is a power of two, else 4 per worker rounded up
# to one (3 workers: 16 buckets, 6/5/5). Connections older than the rules carry no label:
# worker 0's.
LABEL_BASE = 120  # labels 120..125 (of 0..127): a worker index of up to 6 bits


def _bits(workers: int) -> int:
    return max(1, (workers - 1).bit_length())


def _buckets(workers: int) -> int:
    return workers if workers & (workers - 1) == 0 else 1 << (4 * workers - 1).bit_length()


def label_tests(workers: int) -> list[tuple[int, list[int]]]:
    """(port bucket, labels to set) for each bucket of a worker other than 0: the bucket is
    ``(port >> 1) & (buckets - 1)``; its worker is ``bucket % workers``."""
    out = []
    for b in range(_buckets(workers)):
        w = b % workers
        if w:
            out.append((b, [LABEL_BASE + j for j in range(_bits(workers)) if w >> j & 1]))
    return out


def _label_rules(ps: str, workers: int) -> list[str]:
    """nft rules of the helper chain that write a new control connection's worker into it."""
    if workers <= 1:
        return []
    mask = (_buckets(workers) - 1) << 1
    return [f"\t\ttcp dport {{ {ps} }} ct state new tcp sport & {mask:#x} == {b << 1:#x} "
            + " ".join(f"ct label set {n}" for n in labels) for b, labels in label_tests(workers)]


def _worker_bits(workers: int) -> list[tuple[int, list[tuple[int, bool]]]]:
    """(queue offset, [(label, set or not)]) for workers 1..N-1: the index's bits."""
    return [(w, [(LABEL_BASE + j, bool(w >> j & 1)) for j in range(_bits(workers))]) for w in range(1, workers)]


def worker_labels(workers: int) -> list[tuple[int, list[str]]]:
    """(queue offset, label tests in iptables connlabel form) for workers 1..N-1: the index's
    bits as labels set and not set."""
    return [(w, [f"{'' if on else '! '}--label {n}" for n, on in bits]) for w, bits in _worker_bits(workers)]


# tables iptables-nft may create on demand for our queue chains: all our table's comment may name
ON_DEMAND = tuple(f"{NFT_FAMILY[f]} mangle" for f in FAMILIES)


class RuleError(RuntimeError):
    pass


# Where the rule tools live when PATH does not say (an empty environment: `env -i`, some
# service managers): the usual system directories, in the usual order.
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _tool(argv: list[str]) -> list[str]:
    """``argv`` with its program resolved on PATH, then on SYSTEM_PATH."""
    found = shutil.which(argv[0]) or shutil.which(argv[0], path=SYSTEM_PATH)
    if found is None:
        raise RuleError(f"{argv[0]} not found (searched PATH and {SYSTEM_PATH}): install "
                        f"{'nftables' if argv[0] == 'nft' else 'iptables'}")
    return [found, *argv[1:]]


def _run(argv: list[str], stdin: str | None = None) -> str:
    """Run a rule tool; raise RuleError with its words if it fails. Like every rule tool, it
    runs with SIGINT/SIGTERM blocked (``stop.signals_held``): a stop sent to the whole process
    group or cgroup does not cut it short; ftpalg takes the stop after it."""
    try:
        with signals_held():
            p = subprocess.run(_tool(argv), input=stdin, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RuleError(f"{argv[0]}: {e}") from e
    if p.returncode != 0:
        err = p.stderr.strip() or p.stdout.strip()
        raise RuleError(f"{' '.join(argv)}: {err}{_hint(err)}")
    return p.stdout


NEEDS = ("ftpalg run needs CAP_NET_ADMIN in the user namespace that owns this network namespace "
         "(effective, and ambient for the nft and iptables it runs)")


def _hint(err: str) -> str:
    """Why a rule tool failed, where its own words do not say (no capability, legacy lock)."""
    if "xtables.lock" in err:
        return (" (iptables-legacy locks this file: the user needs read access to it, e.g. a tmpfiles.d "
                "entry, or use iptables-nft)")
    if "Operation not permitted" in err or "you must be root" in err:
        return f" ({NEEDS})"
    if "unable to initialize table" in err:
        return " (iptables-legacy also needs CAP_NET_RAW)"
    return ""


def check_access() -> None:
    """Fail early, saying why, where this process may not read nf_tables (the cheapest
    netlink request a rule tool makes); ``_run`` raises with ``NEEDS`` then."""
    _run(["nft", "list", "tables"])


def _quiet(argv: list[str]) -> bool:
    """Run a clean-up command whose failure (e.g. the rule is already gone) is expected."""
    try:
        with signals_held():
            return subprocess.run(_tool(argv), capture_output=True, timeout=30).returncode == 0
    except (RuleError, OSError, subprocess.TimeoutExpired):
        return False


def iptables(family: int) -> str:
    return "iptables" if family == 4 else "ip6tables"


def _restore(text: str, family: int = 4) -> None:
    _run([f"{iptables(family)}-restore", "--noflush", "--wait"], text)


# ---- which segments leave the kernel (queue = "selected") -------------------------------------
# A segment of a control connection is queued only if it may carry, or continue, something
# ftpalg acts on: from the client, a verb that announces or asks for a data address or changes
# the session's mode (or NAT64's ALGS, RFC 6384), anywhere in the segment and in any case; from
# the server, a passive reply or the answer to AUTH; from either, a segment that does not end
# with a line end (it may hold the first part of such a line, even part of its verb); and
# every segment of a connection
# ftpalg has marked (conntrack label FOLLOW_LABEL: a line held for its rest, a multi-line
# passive reply still open, the reply to a NOOP that stands for a command ftpalg answers itself
# on a NAT64 connection). Besides, every FIN: a connection's close closes its pinhole at
# once (conntrack keeps a closed connection, and its expectations, for TIME_WAIT's 120 s).
# Everything else (USER, 331, TYPE, 200, RETR, 150, 226, NOOP, ..., pure ACKs, SYN, RST)
# stays in the kernel, which applies ftpalg's corrections to it itself.
SELECT_VERBS = ("PORT", "EPRT", "LPRT", "PASV", "EPSV", "LPSV", "AUTH", "ALGS")
SELECT_REPLIES = ("227", "228", "229", "234")
FOLLOW_LABEL = 127  # conntrack label: queue the whole stream of this control connection
# Conntrack labels HANDOVER_LABELS (a 2-bit code, HANDOVER_VERBS): the passive command whose
# reply the connection awaited when an ftpalg stopped for a restart; read by the next one when
# it meets that reply (core Alg.hand_over). No rule tests them.
HANDOVER_LABELS = (116, 117)
HANDOVER_VERBS = (b"", b"PASV", b"EPSV", b"LPSV")  # code 0 (none), 1, 2, 3
# Classic BPF (xt_bpf runs it on the packet from its IP header): true when the last byte is
# not LF. ld len; sub #1; tax; ldb [x + 0]; jeq #10 -> ret 0 (ends a line); ret 1.
NO_LINE_END_BPF = "7,128 0 0 0,20 0 0 1,7 0 0 0,80 0 0 0,21 1 0 10,6 0 0 1,6 0 0 0"


def _select_rules(verdict: str) -> list[str]:
    """The chain that picks, among a control connection's segments with payload, those to
    queue (``verdict``); the others return to PREROUTING."""
    c = CHAIN_SELECT
    lines = [f"-A {c} -m connlabel --label {FOLLOW_LABEL} {verdict}",
             f'-A {c} -m bpf --bytecode "{NO_LINE_END_BPF}" {verdict}']
    lines += [f'-A {c} -m conntrack --ctdir ORIGINAL -m string --algo bm --icase --string "{v}" {verdict}'
              for v in SELECT_VERBS]
    lines += [f'-A {c} -m conntrack --ctdir REPLY -m string --algo bm --string "{r}" {verdict}'
              for r in SELECT_REPLIES]
    return lines


# ---- while ftpalg restarts --------------------------------------------------------------------
# A queued segment goes to ftpalg's queue without --queue-bypass while ftpalg is alive or
# restarting, with it otherwise. "Alive" is the element of set ``alive`` in our nft table, with
# a timeout of HANDOVER seconds that the running ftpalg renews every second (``keep_alive``):
# while it is there, chain ``alive`` (prerouting, just before the queue rules) sets mark bit
# ALIVE_MARK on control connections' packets, the queue rules send marked packets to the queue
# without bypass, and chain ``alive-done`` (just after them) clears the bit again, so that no
# rule of the admin's later on sees it. While no process is bound to the queue the kernel then
# drops the segment instead of letting it pass unrewritten, and TCP resends it (after 200,
# 400, 800 ms ...) to the next ftpalg. An ftpalg that stays away stops renewing: HANDOVER
# seconds later segments pass unchanged (fail-open), as they always did while no ftpalg was
# bound. The rules and the element stay across a restart (``ftpalg run`` stopped by SIGUSR1,
# systemd's RestartKillSignal, or killed); a stop by SIGTERM/SIGINT removes everything.
HANDOVER = 5  # seconds: the bound on how long segments wait for a restarting ftpalg
ALIVE_MARK = 0x00800000  # one bit of the packet mark, set between priorities -151 and -149 only


def _queue_targets(queue: int, match: str = "") -> list[str]:
    """Two rules sending ``match`` to ``queue``: without bypass while ftpalg is alive (or
    restarting), with it otherwise."""
    return [f"{match}-m mark --mark {ALIVE_MARK:#x}/{ALIVE_MARK:#x} -j NFQUEUE --queue-num {int(queue)}",
            f"{match}-j NFQUEUE --queue-num {int(queue)} --queue-bypass"]


_RENEWER = nftnl.ElementRenewer()


def keep_alive() -> bool:
    """Renew the alive element for HANDOVER seconds (one nf_tables transaction: the element's
    timeout starts again), over a netlink socket kept open (``nftnl``: ~1/100 of an nft
    process's cost, and the queue loop that calls it every second does not wait for a fork);
    by nft if that fails otherwise than by the table's absence. False if our table is not
    there (or nft failed)."""
    try:
        _RENEWER.renew(NFT_TABLE, "alive", bytes([socket.IPPROTO_TCP]), HANDOVER * 1000)
        return True
    except nftnl.NftError as e:
        if e.errno == errno.ENOENT:
            return False
    except OSError:
        pass
    text = (f"add element inet {NFT_TABLE} alive {{ tcp }}\ndelete element inet {NFT_TABLE} alive {{ tcp }}\n"
            f"add element inet {NFT_TABLE} alive {{ tcp timeout {HANDOVER}s }}\n")
    try:
        _run(["nft", "-f", "-"], text)
    except RuleError:
        return False
    return True


# ---- rule text ------------------------------------------------------------------------------
def _payload_tests(family: int) -> list[str]:
    """u32 tests that hold for a TCP segment carrying payload (IP total length beyond the
    IP and TCP headers), one per TCP data offset (5..15 words); packets with IPv4 options or
    IPv6 extension headers are left to a catch-all rule (rare: queued whatever they carry).
    u32 reads 32-bit words at byte offsets: IPv4 header length at 0, total length at 2, the
    TCP data offset in the top nibble of byte 32 (20 + 12); IPv6 payload length at 4, next
    header at 6, data offset at byte 52 (40 + 12)."""
    out = []
    for doff in range(5, 16):
        if family == 4:
            out.append(f"0>>22&0x3C=20&&32>>28={doff}&&0&0xFFFF={20 + 4 * doff + 1}:65535")
        else:
            out.append(f"4>>8&0xFF=6&&52>>28={doff}&&4>>16={4 * doff + 1}:65535")
    return out


def iptables_queue_rules(ports: Iterable[int], queue: int, family: int = 4, workers: int = 1,
                         selected: bool = False, jump: bool = True) -> str:
    """The queue rule for iptables-restore (``family`` 4) or ip6tables-restore (6).

    Which packets: both directions of connections whose original destination port is a
    control port (conntrack's tuple: the port the client used, before any DNAT; matched on
    the tuple, not on the helper: nft's ``ct helper`` expression, which iptables-nft's
    ``-m helper`` becomes, did not match helpers attached by a ``ct helper`` object on this
    kernel), and of those only segments with payload (commands and replies) and SYN, FIN and
    RST (a connection's start and end). Pure ACKs stay in the kernel, which corrects their
    ack and SACK itself. Segments whose source is not routed back through the interface they
    came in on are never queued (a strict reverse-path check): a segment forged into the
    outside interface with an inside client's address (or the inside server's), in window,
    would otherwise be read as that peer's line (nmap's firewall-bypass.nse; found by
    tests/test_netns_attacks.py). The kernel's rp_filter cannot stop it: it runs at the
    routing decision, after this hook. Packets conntrack calls INVALID (out of window) have
    no conntrack entry and never match ``--ctorigdstport``.

    With several ``workers``, a packet goes to chain FTPALG-WORKERS instead, which picks the
    worker's queue by the connection's conntrack labels (``label_tests``).

    ``selected``: only the segments with payload that chain FTPALG-SELECT picks (see
    SELECT_VERBS above), and FINs; no SYN or RST: a connection is followed from its first
    selected segment; its close is seen (its pinhole closed), and its end otherwise learnt
    from conntrack (a reset entry goes after 10 s, and its expectations with it).

    The queue itself: chain FTPALG-VERDICT (FTPALG-WORKERS with several workers), without
    bypass while ftpalg is alive or restarting (``_queue_targets``). The chains are declared
    in the text, so iptables-restore replaces their contents in one transaction: a restart
    rewrites them with no moment without them (``jump``: the PREROUTING jump is still there
    and not inserted again)."""
    first_header = "0>>22&0x3C=20" if family == 4 else "4>>8&0xFF=6"
    lines = ["*mangle", f":{CHAIN_QUEUE} - [0:0]", f":{CHAIN_CONTROL} - [0:0]"]
    if workers > 1:
        verdict = f"-j {CHAIN_WORKERS}"
        lines.append(f":{CHAIN_WORKERS} - [0:0]")
    else:
        verdict = f"-j {CHAIN_VERDICT}"
        lines.append(f":{CHAIN_VERDICT} - [0:0]")
    if jump:
        lines.append(f"-I PREROUTING 1 -j {CHAIN_QUEUE}")
    for p in sorted(set(ports)):
        lines.append(f"-A {CHAIN_QUEUE} -p tcp -m conntrack --ctorigdstport {int(p)} -j {CHAIN_CONTROL}")
    lines.append(f"-A {CHAIN_CONTROL} -m rpfilter --invert -j RETURN")
    if selected:
        lines.insert(3, f":{CHAIN_SELECT} - [0:0]")
        to_select = f"-j {CHAIN_SELECT}"
        lines.append(f"-A {CHAIN_CONTROL} -p tcp --tcp-flags FIN FIN {verdict}")
        lines.append(f'-A {CHAIN_CONTROL} -m u32 ! --u32 "{first_header}" {to_select}')
        lines += [f'-A {CHAIN_CONTROL} -m u32 --u32 "{t}" {to_select}' for t in _payload_tests(family)]
        lines += _select_rules(verdict)
        lines += _worker_rules(queue, workers)
        return "\n".join(lines + ["COMMIT", ""])
    # The server's SYN-ACK tells the core nothing; SYNs and RSTs are worth a queue slot up to
    # a rate (a SYN flood would otherwise fill the queue and crowd out the lines that need
    # rewriting: a connection whose SYN is not queued is picked up at its first line).
    lines.append(f"-A {CHAIN_CONTROL} -p tcp --tcp-flags SYN,ACK SYN,ACK -j RETURN")
    for flags in ("--syn", "--tcp-flags RST RST"):
        lines.append(f"-A {CHAIN_CONTROL} -p tcp {flags} -m limit --limit {SYN_RATE}/s --limit-burst {SYN_RATE} "
                     f"{verdict}")
        lines.append(f"-A {CHAIN_CONTROL} -p tcp {flags} -j RETURN")
    lines.append(f"-A {CHAIN_CONTROL} -p tcp ! --tcp-flags SYN,FIN,RST NONE {verdict}")
    lines.append(f'-A {CHAIN_CONTROL} -m u32 ! --u32 "{first_header}" {verdict}')
    lines += [f'-A {CHAIN_CONTROL} -m u32 --u32 "{t}" {verdict}' for t in _payload_tests(family)]
    lines += _worker_rules(queue, workers)
    return "\n".join(lines + ["COMMIT", ""])


def _worker_rules(queue: int, workers: int) -> list[str]:
    """Chain FTPALG-VERDICT, or with several workers FTPALG-WORKERS: the worker's queue by the
    connection's labels."""
    if workers <= 1:
        return [f"-A {CHAIN_VERDICT} {t}" for t in _queue_targets(queue)]
    lines = []
    for w, tests in worker_labels(workers):
        match = " ".join(f"-m connlabel {t}" for t in tests)
        lines += [f"-A {CHAIN_WORKERS} {t}" for t in _queue_targets(queue + w, match + " ")]
    lines += [f"-A {CHAIN_WORKERS} {t}" for t in _queue_targets(queue)]
    return lines


def nft_rules(ports: Iterable[int], queue: int | None = None, comment: str = "", workers: int = 1) -> str:
    """Our nft table; with the queue rule if ``queue`` is given (``--queue-backend nft``),
    one per stripe of original source ports with several ``workers``."""
    ps = ", ".join(str(int(p)) for p in sorted(set(ports)))
    lines = [f"table inet {NFT_TABLE} {{"]
    if comment:
        lines.append(f'\tcomment "{comment}"')
    lines += [
        f"\tct helper {HELPER_OBJ} {{",
        f'\t\ttype "{HELPER}" protocol tcp',
        "\t\tl3proto inet",
        "\t}",
        "",
        "\tchain helper {",
        "\t\ttype filter hook prerouting priority -175; policy accept;",
        f'\t\ttcp dport {{ {ps} }} ct state new ct helper set "{HELPER_OBJ}"',
        *_label_rules(ps, workers),
        "\t}",
        "",
        "\tset alive {",  # see keep_alive: there while ftpalg is alive, or restarting
        "\t\ttype inet_proto",
        "\t\tflags timeout",
        f"\t\telements = {{ tcp timeout {HANDOVER}s }}",
        "\t}",
        "",
        "\tchain alive {",  # just before mangle PREROUTING (-150), where the queue rules are
        "\t\ttype filter hook prerouting priority -151; policy accept;",
        f"\t\tmeta l4proto tcp ct original proto-dst {{ {ps} }} meta l4proto @alive "
        f"meta mark set meta mark | {ALIVE_MARK:#x}",
        "\t}",
        "",
        "\tchain alive-done {",  # just after it: the bit is gone before any other rule looks
        "\t\ttype filter hook prerouting priority -149; policy accept;",
        f"\t\tmeta mark & {ALIVE_MARK:#x} != 0 meta mark set meta mark & {~ALIVE_MARK & 0xFFFFFFFF:#x}",
        "\t}",
        "",
        "\tchain nat-prerouting {",
        "\t\ttype nat hook prerouting priority dstnat; policy accept;",
        "\t}",
        "",
        "\tchain nat-postrouting {",
        "\t\ttype nat hook postrouting priority srcnat; policy accept;",
        "\t}",
    ]
    if queue is not None:
        lines += [
            "",
            "\tchain control {",  # not "queue": nft 1.0.6 takes that for its keyword
            "\t\ttype filter hook prerouting priority mangle; policy accept;",
            "\t\tfib saddr . iif oif missing return",  # forged source: never read (see iptables_queue_rules)
            "\t\ttcp flags & (syn | ack) == syn | ack return",
            f"\t\ttcp flags & (syn | rst) != 0 limit rate over {SYN_RATE}/second burst {SYN_RATE} packets return",
        ]
        match = f"meta l4proto tcp ct original proto-dst {{ {ps} }}"
        for w, bits in _worker_bits(workers) if workers > 1 else []:
            labels = " ".join(f"ct label {'' if on else '!= '}{n}" for n, on in bits)
            lines.append(f"\t\t{match} {labels} queue flags bypass to {int(queue) + w}")
        lines.append(f"\t\t{match} queue flags bypass to {int(queue)}")
        lines.append("\t}")
    return "\n".join(lines + ["}", ""])


# ---- the kernel's state ---------------------------------------------------------------------
def nft_queue_available() -> bool:
    """Whether this kernel loads nft's queue statement: try it in a scratch table. (Loading
    is all it tells: ``--queue-backend auto`` does not use it, see ``StaticRules``.)"""
    probe = ("table inet ftpalg_probe {\n\tchain c {\n\t\ttype filter hook prerouting priority 0;\n"
             "\t\tqueue flags bypass to 0\n\t}\n}\n")
    try:
        _run(["nft", "-f", "-"], probe)
    except RuleError:
        return False
    finally:
        _quiet(["nft", "delete", "table", "inet", "ftpalg_probe"])
    return True


def nft_table_exists(family: str, name: str) -> bool:
    return _quiet(["nft", "list", "table", family, name])


def _table_is_empty(family: str, name: str) -> bool:
    """Whether an nft table holds nothing but empty chains."""
    try:
        text = _run(["nft", "list", "table", family, name])
    except RuleError:
        return False
    for line in text.splitlines():
        s = line.strip()
        if s and not s.startswith(("table ", "chain ", "type ", "}", "policy ")):
            return False
    return True


def our_comment() -> str:
    """The comment of our table (the on-demand tables an earlier run created), or ''."""
    try:
        text = _run(["nft", "list", "table", "inet", NFT_TABLE])
    except RuleError:
        return ""
    for line in text.splitlines():
        s = line.strip()
        if s.startswith('comment "'):
            return s[len('comment "'):].rstrip('"')
    return ""


def _created(comment: str) -> list[str]:
    """The on-demand tables our table's comment names. The comment is read back from the
    kernel and goes into nft text and argv again: anything but those names is ignored."""
    return [t for t in comment.split(",") if t in ON_DEMAND]


def queue_chains_present(workers: int = 1, selected: bool = False) -> bool:
    """What ``--no-rules`` expects the admin to have loaded: our nft table and a queue rule
    (written for several workers if there are several: the labels and the dispatch; with the
    selection chain if only selected segments are to be queued)."""
    check_access()  # else a table we may not read would look missing
    if not nft_table_exists("inet", NFT_TABLE):
        return False
    text = _run(["nft", "list", "table", "inet", NFT_TABLE])
    if workers > 1 and "ct label set" not in text:
        return False
    if "queue" in text:
        return True
    chains = [CHAIN_QUEUE] + ([CHAIN_WORKERS] if workers > 1 else []) + ([CHAIN_SELECT] if selected else [])
    return all(_quiet([iptables(f), "-w", "-t", "mangle", "-S", c]) for f in FAMILIES for c in chains)


def _remove_jumps(jumps: Iterable[tuple[str, str, str]], chains: Iterable[tuple[str, str]] = ()) -> None:
    """Delete each (table, hook, chain) jump (it may have been inserted more than once), its
    chain and each (table, chain) jumped to only from ours; all are emptied before any is
    deleted (a chain still jumped to cannot go). Missing pieces are fine."""
    drop = [(t, c) for t, _, c in jumps] + list(chains)
    for f in FAMILIES:
        ipt = iptables(f)
        for table, hook, chain in jumps:
            for _ in range(16):
                if not _quiet([ipt, "-w", "-t", table, "-D", hook, "-j", chain]):
                    break
        for op in ("-F", "-X"):
            for table, chain in drop:
                _quiet([ipt, "-w", "-t", table, op, chain])


class StaticRules:
    """Our nft table and the queue rule, IPv4 and IPv6, installed by ``ftpalg run``. The
    queue rule is iptables' NFQUEUE (``backend`` "auto" or "iptables"), or nft's queue
    statement in our table ("nft": untested with traffic, opt-in)."""

    def __init__(self, ports: Iterable[int], queue: int, backend: str = "auto", workers: int = 1,
                 selected: bool = False) -> None:
        self.ports = sorted(set(ports))
        self.queue = queue
        self.workers = workers
        self.selected = selected
        self.backend = backend
        self.created: list[str] = []  # "ip mangle" etc.: tables that exist because of us

    def install(self) -> str:
        """Install everything (replacing what an earlier run left, with no moment without
        it: a restart); return the queue backend."""
        check_access()
        self.created = _created(our_comment())
        jumped = {f: _quiet([iptables(f), "-w", "-t", "mangle", "-C", "PREROUTING", "-j", CHAIN_QUEUE])
                  for f in FAMILIES}
        if not all(jumped.values()):  # not a restart of a run that left its rules: start clean
            self._remove_queue_jumps()
            jumped = dict.fromkeys(FAMILIES, False)
        else:  # a restart: what earlier releases left goes, ours stays until replaced
            _remove_jumps(OLD_JUMPS)
        if self.backend == "auto":
            # the path the test suite runs; nft's queue statement only when asked for: it is
            # only loaded, never run with traffic, in the tests (the test kernel's does not
            # queue)
            self.backend = "iptables"
        if self.backend == "nft" and self.selected:
            raise RuleError('queue = "selected" needs the iptables backend (nft has no match for text anywhere '
                            'in a segment): --queue-backend iptables, or --queue all')
        if self.backend == "iptables":
            for f in FAMILIES:
                name = f"{NFT_FAMILY[f]} mangle"
                if name not in self.created and not nft_table_exists(NFT_FAMILY[f], "mangle"):
                    self.created.append(name)
        # one nft transaction: the old table (if any) is replaced atomically
        text = (f"add table inet {NFT_TABLE}\ndelete table inet {NFT_TABLE}\n"
                + nft_rules(self.ports, self.queue if self.backend == "nft" else None, ",".join(self.created),
                            self.workers))
        _run(["nft", "-f", "-"], text)
        if self.backend == "iptables":
            for f in FAMILIES:
                _restore(iptables_queue_rules(self.ports, self.queue, f, self.workers, self.selected,
                                              jump=not jumped[f]), f)
            self._drop_unused_subchains()
        elif any(jumped.values()):  # from iptables to nft's queue: the iptables chains go
            self._remove_queue_jumps()
        return self.backend

    def _drop_unused_subchains(self) -> None:
        """Our chains that the rules just written do not use (an earlier run's with other
        settings): emptied and deleted (nothing jumps to them any more)."""
        used = {CHAIN_CONTROL} | ({CHAIN_WORKERS} if self.workers > 1 else {CHAIN_VERDICT})
        used |= {CHAIN_SELECT} if self.selected else set()
        _remove_jumps((), [sub for sub in SUBCHAINS if sub[1] not in used])

    def _remove_queue_jumps(self) -> None:
        _remove_jumps(JUMPS + OLD_JUMPS, SUBCHAINS)

    def remove(self) -> None:
        """Remove everything ftpalg installed, and the tables created for it; missing
        pieces are fine."""
        created = set(self.created) | set(_created(our_comment()))
        self._remove_queue_jumps()
        _quiet(["nft", "delete", "table", "inet", NFT_TABLE])
        for t in sorted(created):
            family, name = t.split()
            if _table_is_empty(family, name):
                _quiet(["nft", "delete", "table", family, name])
        self.created = []
