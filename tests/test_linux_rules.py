from pathlib import Path

import pytest

from ftpalg import cli
from ftpalg.core.table import Pinhole
from ftpalg.linux.rules import iptables_queue_rules, nft_queue_rules, pinhole_rules

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


@pytest.mark.parametrize("part, path", [("queue-iptables", "queue.iptables"), ("queue-nft", "queue.nft"),
                                        ("pinholes", "pinholes.iptables")])
def test_deploy_files_match_what_run_installs(capsys, part, path):
    assert cli.main(["rules", part]) == 0
    assert capsys.readouterr().out == (DEPLOY / path).read_text()


def test_queue_rules_cover_both_directions_of_every_port():
    text = iptables_queue_rules([21, 2121, 21], 7)
    for p in (21, 2121):
        assert f"--dport {p} -j NFQUEUE --queue-num 7 --queue-bypass" in text
        assert f"--sport {p} -j NFQUEUE --queue-num 7 --queue-bypass" in text
    assert text.count("--dport 21 ") == 1
    assert "tcp dport { 21, 2121 } queue flags bypass to 7" in nft_queue_rules([2121, 21], 7)


def test_pinhole_rules_active_client_behind_snat():
    ph = Pinhole(3, "203.0.113.2", "203.0.113.1", 50001, "10.0.0.2", 50000, 0.0)
    text = pinhole_rules(ph, "-I")
    tag = '-m comment --comment "ftpalg pinhole 3"'
    mark = "-m connmark --mark 0x1000000/0x1000000"
    nat, filt = text.split("*filter")
    # one SYN admits one connection and marks it; only marked connections are translated
    assert ("-I FTPALG-PINHOLES 1 -s 203.0.113.2/32 -d 203.0.113.1/32 -p tcp -m tcp --dport 50001 --syn "
            f"-m limit --limit 1/day --limit-burst 1 {tag} -j CONNMARK --or-mark 0x1000000") in nat
    assert (f"-s 203.0.113.2/32 -d 203.0.113.1/32 -p tcp -m tcp --dport 50001 {mark} {tag} "
            "-j DNAT --to-destination 10.0.0.2:50000") in nat
    # each is inserted at the top: the DNAT rule first, so that the marking rule ends up above it
    assert nat.index("-j DNAT") < nat.index("-j CONNMARK")
    assert "FTPALG-SNAT" not in nat  # the control connection had no DNAT: no SNAT here
    assert (f"-s 203.0.113.2/32 -d 10.0.0.2/32 -p tcp -m tcp --dport 50000 {mark} -m conntrack --ctstate NEW "
            "--ctorigsrc 203.0.113.2/32 --ctorigdst 203.0.113.1/32 --ctorigdstport 50001") in filt
    assert pinhole_rules(ph, "-D").replace("-D FTPALG-PINHOLES", "-I FTPALG-PINHOLES 1").count("\n") == \
        text.count("\n")


def test_pinhole_rules_snat_and_ipv6_without_nat():
    ph = Pinhole(4, "10.1.0.2", "203.0.113.100", 40000, "203.0.113.100", 40000, 0.0, snat="198.51.100.2")
    text = pinhole_rules(ph, "-I")
    assert "DNAT" not in text  # same address and port: nothing to translate on the way in
    assert "-I FTPALG-SNAT 1 -s 10.1.0.2/32 -d 203.0.113.100/32" in text and "-j SNAT --to-source 198.51.100.2" in text
    v6 = Pinhole(5, "2001:db8:1::100", "2001:db8:3::2", 30000, "2001:db8:3::2", 30000, 0.0)
    text = pinhole_rules(v6, "-I")
    assert "-s 2001:db8:1::100/128 -d 2001:db8:3::2/128" in text and "DNAT" not in text and "SNAT" not in text
    assert "CONNMARK" in text and "-j ACCEPT" in text
    nat66 = Pinhole(6, "2001:db8:1::2", "2001:db8:1::1", 30000, "fd00:1::2", 30000, 0.0)
    assert "-j DNAT --to-destination [fd00:1::2]:30000" in pinhole_rules(nat66, "-I")


def test_pinhole_removal_is_batched():
    phs = [Pinhole(i, "203.0.113.2", "203.0.113.1", 50000 + i, "10.0.0.2", 50000 + i, 0.0) for i in range(3)]
    text = pinhole_rules(phs, "-D")
    assert text.count("COMMIT") == 2 and text.count("-D FTPALG-PINHOLES") == 9


@pytest.mark.parametrize("bad", ["10.0.0.2 -j ACCEPT", "10.0.0.2\n-F", "::1", "10.0.0.2/0"])
def test_pinhole_rules_refuse_anything_but_addresses(bad):
    ph = Pinhole(3, "203.0.113.2", "203.0.113.1", 50001, bad, 50000, 0.0)
    with pytest.raises(ValueError):
        pinhole_rules(ph, "-I")
