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


def test_pinhole_rules():
    ph = Pinhole(3, "203.0.113.2", "203.0.113.1", 50001, "10.0.0.2", 50000, 0.0)
    text = pinhole_rules(ph, "-I")
    assert ("-I FTPALG-PINHOLES 1 -s 203.0.113.2/32 -d 203.0.113.1/32 -p tcp -m tcp --dport 50001 --syn "
            "-m limit --limit 1/day --limit-burst 1 "
            '-m comment --comment "ftpalg pinhole 3" -j DNAT --to-destination 10.0.0.2:50000') in text
    assert "--ctstate DNAT --ctorigdst 203.0.113.1 --ctorigdstport 50001" in text
    assert pinhole_rules(ph, "-D").replace("-D FTPALG-PINHOLES", "-I FTPALG-PINHOLES 1") == text


def test_pinhole_removal_is_batched():
    phs = [Pinhole(i, "203.0.113.2", "203.0.113.1", 50000 + i, "10.0.0.2", 50000 + i, 0.0) for i in range(3)]
    text = pinhole_rules(phs, "-D")
    assert text.count("COMMIT") == 2 and text.count("-D FTPALG-PINHOLES") == 6


@pytest.mark.parametrize("bad", ["10.0.0.2 -j ACCEPT", "10.0.0.2\n-F", "::1"])
def test_pinhole_rules_refuse_anything_but_addresses(bad):
    ph = Pinhole(3, "203.0.113.2", "203.0.113.1", 50001, bad, 50000, 0.0)
    with pytest.raises(ValueError):
        pinhole_rules(ph, "-I")
