import ipaddress
import struct
from collections import Counter
from pathlib import Path

import pytest

from ftpalg import cli
from ftpalg.linux import ctnetlink, rules
from ftpalg.linux.rules import iptables_queue_rules, nft_rules

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


@pytest.mark.parametrize("part, path", [("nft", "ftpalg.nft"), ("nft-queue", "ftpalg-queue.nft"),
                                        ("queue-iptables", "queue.iptables")])
def test_deploy_files_match_what_run_installs(capsys, part, path):
    assert cli.main(["rules", part]) == 0
    assert capsys.readouterr().out == (DEPLOY / path).read_text()


def test_queue_rules_cover_both_directions_of_every_control_connection():
    text = iptables_queue_rules([21, 2121, 21], 7)
    for p in (21, 2121):  # conntrack's original destination port: both directions, before DNAT
        assert f"-A FTPALG-QUEUE -p tcp -m conntrack --ctorigdstport {p} -j FTPALG-CONTROL" in text
    assert text.count("--ctorigdstport 21 ") == 1 and text.startswith("*mangle\n")
    nft = nft_rules([2121, 21], 7)
    assert "ct original proto-dst { 21, 2121 } queue flags bypass to 7" in nft
    assert "queue" not in nft_rules([21])


@pytest.mark.parametrize("workers", [2, 3, 4, 5, 8, 64])
def test_workers_get_every_port_bucket_and_their_labels_name_one_worker_each(workers):
    """Every client port lands on exactly one worker (the labels its bucket gets written
    into the connection are that worker's index, and the dispatch rule of that index is
    the only one matching them); ports spread evenly (at most 4:3 apart, any N)."""
    buckets = {b: labels for b, labels in rules.label_tests(workers)}
    n = max(buckets) + 1 if workers & (workers - 1) else workers
    share = Counter()
    dispatch = rules.worker_labels(workers)
    # every even client port (the bucket rules test bit 1 up), by the bucket it falls in
    for bucket, ports in Counter((port >> 1) % n for port in range(0, 65536, 2)).items():
        labels = set(buckets.get(bucket, []))
        index = sum(1 << (label - rules.LABEL_BASE) for label in labels)
        matching = [w for w, tests in dispatch
                    if all((t.startswith("!") ^ (int(t.split()[-1]) in labels)) for t in tests)]
        assert matching == ([index] if index else [])  # worker 0: the last rule, no label test
        share[index] += ports
    assert sorted(share) == list(range(workers))
    assert max(share.values()) <= min(share.values()) * 4 / 3
    assert max(label for _, ls in buckets.items() for label in ls) <= 127


def test_several_workers_queue_by_the_label_written_at_the_connection_start():
    text = iptables_queue_rules([21], 100, 4, 3)
    assert "-A FTPALG-CONTROL -p tcp ! --tcp-flags SYN,FIN,RST NONE -j FTPALG-WORKERS" in text
    assert "-j NFQUEUE --queue-num 100 --queue-bypass" in text.splitlines()[-2]  # worker 0: the rest
    assert "-m connlabel --label 120 -m connlabel ! --label 121 -j NFQUEUE --queue-num 101" in text
    assert "-m connlabel ! --label 120 -m connlabel --label 121 -j NFQUEUE --queue-num 102" in text
    nft = nft_rules([21], 100, workers=2)
    assert "tcp dport { 21 } ct state new tcp sport & 0x2 == 0x2 ct label set 120" in nft
    assert "ct original proto-dst { 21 } ct label 120 queue flags bypass to 101" in nft
    assert "label" not in nft_rules([21], 100) + iptables_queue_rules([21], 100)
    assert cli.main(["check-config", "--config", "/dev/null", "--workers", "2", "--queue-num", "65535"]) == 2


@pytest.mark.parametrize("family", [4, 6])
def test_only_segments_with_payload_and_syn_fin_rst_are_queued(family):
    """Check the u32 tests against packets built by scapy: every data offset, with and
    without payload, and a pure ACK with SACK options."""
    from scapy.layers.inet import IP, TCP
    from scapy.layers.inet6 import IPv6

    text = iptables_queue_rules([21], 7, family)
    rules = [line for line in text.splitlines() if line.startswith("-A FTPALG-CONTROL -m u32 --u32")]
    tests = [r.split('"')[1] for r in rules]

    def u32(raw: bytes, test: str) -> bool:  # the u32 match, for the forms we generate
        for cond in test.split("&&"):
            loc, rng = cond.split("=")
            parts = loc.replace(">>", " >> ").replace("&", " & ").split()
            val = int.from_bytes(raw[int(parts[0]):int(parts[0]) + 4], "big")
            for op, num in zip(parts[1::2], parts[2::2], strict=True):
                val = val >> int(num) if op == ">>" else val & int(num, 0)
            lo, _, hi = rng.partition(":")
            if not int(lo, 0) <= val <= int(hi or lo, 0):
                return False
        return True

    ip = (lambda: IP(src="10.0.0.2", dst="203.0.113.2")) if family == 4 else (
        lambda: IPv6(src="fd00::2", dst="2001:db8::2"))
    for opts in ([], [("NOP", None)] * 4, [("SAck", (1, 2, 3, 4, 5, 6, 7, 8)), ("NOP", None), ("NOP", None)],
                 [("Timestamp", (1, 2)), ("NOP", None), ("NOP", None)]):
        for payload in (b"", b"x", b"PORT 10,0,0,2,4,1\r\n"):
            raw = bytes(ip() / TCP(sport=40000, dport=21, flags="PA" if payload else "A", options=opts) / payload)
            assert any(u32(raw, t) for t in tests) == bool(payload), (opts, payload)
    assert "! --tcp-flags SYN,FIN,RST NONE -j FTPALG-VERDICT" in text


def test_helper_is_attached_after_conntrack_and_before_nat():
    text = nft_rules([21])
    assert 'type "sane" protocol tcp' in text and "l3proto inet" in text
    assert "type filter hook prerouting priority -175;" in text  # conntrack -200 < -175 < dstnat -100
    assert 'tcp dport { 21 } ct state new ct helper set "ftpalg-sane"' in text
    assert "type nat hook prerouting priority dstnat;" in text  # empty: NAT set up for IPv6 too
    assert 'comment "ip mangle"' in nft_rules([21], comment="ip mangle")


def _attrs(data):
    return dict(ctnetlink._attrs(data))


def test_expectation_message_layout():
    p = lambda a: ipaddress.ip_address(a).packed  # noqa: E731
    master = (p("10.0.0.2"), 40000, p("203.0.113.2"), 21)
    body = ctnetlink.expect_body(master, p("203.0.113.2"), p("203.0.113.1"), 50001, 50000, active=True)
    a = _attrs(body)
    assert ctnetlink._parse_tuple(a[ctnetlink.CTA_EXPECT_MASTER]) == master
    assert ctnetlink._parse_tuple(a[ctnetlink.CTA_EXPECT_TUPLE]) == (p("203.0.113.2"), 0, p("203.0.113.1"), 50001)
    mask = ctnetlink._parse_tuple(a[ctnetlink.CTA_EXPECT_MASK])
    assert mask == (b"\xff" * 4, 0, b"\xff" * 4, 0xFFFF)  # exact peer, any source port
    nat = _attrs(a[ctnetlink.CTA_EXPECT_NAT])
    assert struct.unpack("!I", nat[ctnetlink.CTA_EXPECT_NAT_DIR]) == (ctnetlink.IP_CT_DIR_REPLY,)
    assert ctnetlink._parse_tuple(nat[ctnetlink.CTA_EXPECT_NAT_TUPLE])[1] == 50000  # the kernel's saved port
    assert a[ctnetlink.CTA_EXPECT_FN] == b"nat-follow-master\0"
    passive = _attrs(ctnetlink.expect_body(master, p("10.0.0.2"), p("203.0.113.2"), 3000, 3000, active=False))
    nat = _attrs(passive[ctnetlink.CTA_EXPECT_NAT])
    assert struct.unpack("!I", nat[ctnetlink.CTA_EXPECT_NAT_DIR]) == (ctnetlink.IP_CT_DIR_ORIGINAL,)


def test_conntrack_entry_parsing_round_trips_our_own_attributes():
    p = lambda a: ipaddress.ip_address(a).packed  # noqa: E731
    reply = (p("2001:db8::2"), 21, p("2001:db8::1"), 61000)
    adj = ctnetlink.KernelAdj(1000, 5, -3)
    body = (ctnetlink.tuple_attr(reply, ctnetlink.CTA_TUPLE_REPLY)
            + ctnetlink._attr(ctnetlink.CTA_HELP, ctnetlink._attr(ctnetlink.CTA_HELP_NAME, b"sane\0"), True)
            + ctnetlink._seqadj_attr(ctnetlink.CTA_SEQ_ADJ_ORIG, adj))
    e = ctnetlink.parse_entry(body)
    assert e.reply == reply and e.helper == "sane" and e.seqadj == (adj, ctnetlink.KernelAdj())
    with pytest.raises(ctnetlink.CtError):
        ctnetlink.parse_entry(b"")


@pytest.mark.netns
def test_nft_queue_table_parses_with_this_nft():
    """nft 1.0.6 reads a chain named ``queue`` as its keyword (a syntax error): the table for
    kernels with nft queue must parse. Checked in a throw-away network namespace, where the
    only error allowed is this kernel's missing queue expression."""
    import subprocess

    for workers in (1, 3):
        res = subprocess.run(["unshare", "-n", "nft", "-c", "-f", "-"], input=nft_rules([21], 7, workers=workers),
                             capture_output=True, text=True, timeout=30)
        assert "syntax error" not in res.stderr, res.stderr
        assert res.returncode == 0 or "Could not process rule" in res.stderr, res.stderr


def test_rule_tools_are_found_without_a_path(monkeypatch):
    """Run from an empty environment (env -i, some service managers): nft and iptables are
    still found in the system directories; a missing one is named with what to install."""
    from ftpalg.linux import rules

    monkeypatch.setenv("PATH", "")
    assert Path(rules._tool(["nft", "list", "tables"])[0]).name == "nft"
    with pytest.raises(rules.RuleError, match="nosuchtool not found .*install iptables"):
        rules._tool(["nosuchtool"])


@pytest.mark.parametrize("backend, want", [("auto", "iptables"), ("iptables", "iptables"), ("nft", "nft")])
def test_auto_queues_through_iptables_even_where_nft_queue_loads(monkeypatch, backend, want):
    """``--queue-backend auto`` is the path the test suite runs (iptables' NFQUEUE), also on a
    kernel whose nft loads the queue statement: that one is only loaded in the tests, never
    run with traffic, so it is used only when asked for. The rule tools are recorded, not run."""
    ran: list[tuple[str, str | None]] = []

    def run(argv, stdin=None):
        ran.append((" ".join(argv), stdin))
        if argv[:2] == ["nft", "list"] and argv[-1] == rules.NFT_TABLE:
            raise rules.RuleError("no such table")
        return ""

    monkeypatch.setattr(rules, "_run", run)
    monkeypatch.setattr(rules, "_quiet", lambda argv: True)
    monkeypatch.setattr(rules, "nft_queue_available", lambda: True)  # a kernel that loads it
    assert rules.StaticRules([21], 2121, backend).install() == want
    loaded = "".join(stdin for argv, stdin in ran if argv == "nft -f -" and stdin)
    restored = [argv.split()[0] for argv, _ in ran if "-restore" in argv]
    assert ("queue flags bypass" in loaded) == (want == "nft")
    assert restored == ([] if want == "nft" else ["iptables-restore", "ip6tables-restore"])


KEEP_ALIVE = r"""
import re, subprocess, sys
from ftpalg.linux import rules

def expires():
    text = subprocess.run(["nft", "list", "set", "inet", "ftpalg", "alive"], capture_output=True, text=True).stdout
    m = re.search(r"expires (?:(\d+)s)?(?:(\d+)ms)?", text)
    return None if m is None else int(m.group(1) or 0) + int(m.group(2) or 0) / 1000

def no_nft(*a, **kw):
    raise AssertionError("nft run: the netlink path failed")

subprocess.run(["nft", "-f", "-"], input=rules.nft_rules([21]), text=True, check=True)
subprocess.run(["nft", "-f", "-"], text=True, check=True, input=
               "delete element inet ftpalg alive { tcp }\nadd element inet ftpalg alive { tcp timeout 2s }\n")
before = expires()
rules._run = no_nft
ok = rules.keep_alive()
after = expires()
subprocess.run(["nft", "delete", "table", "inet", "ftpalg"], check=True)
print(before, ok, after, rules.keep_alive())
"""


@pytest.mark.netns
def test_keep_alive_renews_the_element_over_netlink_and_says_when_the_table_is_gone():
    """``keep_alive`` (every second while ftpalg serves) starts the alive element's timeout
    again with its own netlink transaction, no nft process; without our table it answers
    False. In a throw-away network namespace."""
    import subprocess
    import sys

    res = subprocess.run(["unshare", "-n", sys.executable, "-c", KEEP_ALIVE], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    before, ok, after, gone = res.stdout.split()
    assert float(before) <= 2.0 and ok == "True" and float(after) > rules.HANDOVER - 1 and gone == "False"
