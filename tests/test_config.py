"""The configuration file, its checks, the options that override it, ``ftpalg check-config``
(no root: nothing is installed, nothing is started)."""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import tomllib
from pathlib import Path

import pytest

from alg_helpers import Driven, FakeKernel
from ftpalg import cli, config
from ftpalg.config import Config, ConfigError, OptionText, from_toml
from ftpalg.core.policy import DEFAULT_LIMITS, Limits
from ftpalg.linux.rules import RuleError, iptables_queue_rules, nft_rules
from ftpalg.linux.serve import serve

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "ftpalg.toml"


@pytest.fixture(autouse=True)
def no_system_file(tmp_path, monkeypatch):
    """The default file is one of ours, absent unless a test writes it."""
    monkeypatch.setattr(config, "DEFAULT_PATH", tmp_path / "etc-ftpalg.toml")


def toml(section: str, key: str, value: str) -> str:
    return f"[{section}]\n{key} = {value}\n"


def file_error(tmp_path, text: str) -> ConfigError:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        config.load(path)
    assert str(e.value).startswith(f"{path}: ")
    return e.value


# ---- defaults, and the deploy file ----------------------------------------------------------
def test_defaults_are_todays_cli_defaults():
    c = Config()
    assert c.gateway == config.Gateway((21,), 2121, "auto", True, 120.0)
    assert c.gateway.queue == "selected" and c.queue_selected
    assert not parse("run", "--audit").queue_selected  # the audit log needs every line
    assert not parse("run", "--queue", "all").queue_selected
    assert c.limits() == DEFAULT_LIMITS == Limits()
    assert (c.log.level, c.audit.enabled, c.audit.file) == ("info", False, "")
    assert (c.metrics.listen, c.status.socket) == ("127.0.0.1:9121", "@ftpalg-status")


def test_deploy_file_is_the_defaults_with_every_key():
    assert config.load(DEPLOY) == Config()
    data = tomllib.loads(DEPLOY.read_text())
    assert {f"{s}.{k}" for s, t in data.items() for k in t} == set(config.KEYS)
    for line in DEPLOY.read_text().splitlines():  # each key has a comment just above it
        if "=" in line and not line.startswith("#"):
            lines = DEPLOY.read_text().splitlines()
            assert lines[lines.index(line) - 1].startswith("#"), line


def test_keys_table_matches_the_dataclasses():
    fields = {f"{s}.{f.name}" for s, cls in config.SECTIONS.items() for f in dataclasses.fields(cls)}
    assert fields == set(config.KEYS)
    assert {f.name for f in dataclasses.fields(Config)} == set(config.SECTIONS) | {"source", "origins"}


def test_empty_file_is_the_defaults_and_keys_left_out_keep_theirs():
    assert from_toml("") == Config()
    c = from_toml("[policy]\nmin_port = 2000\n")
    assert c.policy.min_port == 2000 and c.gateway == Config().gateway
    assert c.limits() == Limits(min_port=2000)


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config().gateway.queue_num = 1  # type: ignore[misc]


# ---- every key's checks -------------------------------------------------------------------
GOOD = [
    ("gateway", "control_ports", "[2121, 21, 21]", (21, 2121)),
    ("gateway", "control_ports", "[65535, 1]", (1, 65535)),
    ("gateway", "queue_num", "0", 0),
    ("gateway", "queue_num", "65535", 65535),
    ("gateway", "workers", "2", 2),
    ("gateway", "workers", "64", 64),
    ("gateway", "queue_backend", '"nft"', "nft"),
    ("gateway", "queue_backend", '"IPTables"', "iptables"),
    ("gateway", "queue", '"selected"', "selected"),
    ("gateway", "install_rules", "false", False),
    ("gateway", "pinhole_timeout", "30", 30.0),
    ("gateway", "pinhole_timeout", "0.5", 0.5),
    ("gateway", "pinhole_timeout", "86400", 86400.0),
    ("policy", "min_port", "1", 1),
    ("policy", "min_port", "65535", 65535),
    ("policy", "max_flows", "1", 1),
    ("policy", "max_pinholes", "100000", 100000),
    ("policy", "max_pinholes_per_client", "1", 1),
    ("policy", "max_held_bytes", "1", 1),
    ("log", "level", '"debug"', "debug"),
    ("log", "level", '"WARNING"', "warning"),
    ("audit", "enabled", "true", True),
    ("audit", "file", '"/var/log/ftpalg/audit.log"', "/var/log/ftpalg/audit.log"),
    ("metrics", "listen", '""', ""),
    ("metrics", "listen", '"0.0.0.0:9121"', "0.0.0.0:9121"),
    ("metrics", "listen", '"[::1]:9121"', "[::1]:9121"),
    ("metrics", "listen", '"localhost:80"', "localhost:80"),
    ("status", "socket", '"@other"', "@other"),
    ("status", "socket", '"/run/ftpalg/status.sock"', "/run/ftpalg/status.sock"),
    ("status", "socket", '""', ""),
    ("nat64", "pool", '"192.168.255.0/24"', ("192.168.255.0/24",)),
    ("nat64", "pool", '["192.168.255.7/24", "10.64.0.0/16", "192.168.255.0/24"]',
     ("192.168.255.0/24", "10.64.0.0/16")),
    ("nat64", "pool", "[]", ()),
    ("nat64", "prefix", '"2001:db8:64::/96"', "2001:db8:64::/96"),
    ("nat64", "prefix", '"64:FF9B::/96"', "64:ff9b::/96"),
    ("nat64", "prefix", '""', ""),
]


@pytest.mark.parametrize("section, key, value, want", GOOD)
def test_good_values(section, key, value, want):
    c = from_toml(toml(section, key, value))
    assert getattr(getattr(c, section), key) == want
    assert type(getattr(getattr(c, section), key)) is type(want)


BAD = [
    # wrong type (TOML booleans are not integers; strings are not numbers in a file)
    ("gateway", "control_ports", "21", "must be an array of ports ([21]), not an integer (21)"),
    ("gateway", "control_ports", '["21"]', 'must be an integer, not a string ("21")'),
    ("gateway", "control_ports", "[21, true]", "element 2: must be an integer, not a boolean (true)"),
    ("gateway", "queue_num", '"2121"', 'must be an integer, not a string ("2121")'),
    ("gateway", "queue_num", "true", "must be an integer, not a boolean (true)"),
    ("gateway", "queue_num", "1.0", "must be an integer, not a float (1.0)"),
    ("gateway", "queue_backend", "1", "must be a string, not an integer (1)"),
    ("gateway", "queue", '"some"', 'must be one of selected, all, not "some"'),
    ("gateway", "workers", "2.0", "must be an integer, not a float (2.0)"),
    ("gateway", "install_rules", "1", "must be true or false, not an integer (1)"),
    ("gateway", "install_rules", '"no"', 'must be true or false, not a string ("no")'),
    ("gateway", "pinhole_timeout", "true", "must be a number of seconds, not a boolean (true)"),
    ("gateway", "pinhole_timeout", '"120"', 'must be a number of seconds, not a string ("120")'),
    ("policy", "min_port", "true", "must be an integer, not a boolean (true)"),
    ("policy", "max_flows", "[1]", "must be an integer, not an array"),
    ("policy", "max_pinholes", "{a = 1}", "must be an integer, not a table"),
    ("policy", "max_pinholes_per_client", "false", "must be an integer, not a boolean (false)"),
    ("policy", "max_held_bytes", "1e6", "must be an integer, not a float (1000000.0)"),
    ("log", "level", "2", "must be a string, not an integer (2)"),
    ("audit", "enabled", '"yes"', 'must be true or false, not a string ("yes")'),
    ("audit", "file", "false", "must be a string, not a boolean (false)"),
    ("metrics", "listen", "9121", "must be a string, not an integer (9121)"),
    ("status", "socket", "true", "must be a string, not a boolean (true)"),
    # out of range
    ("gateway", "control_ports", "[]", "must name at least one port"),
    ("gateway", "control_ports", "[0]", "must be in 1..65535, not 0"),
    ("gateway", "control_ports", "[21, 70000]", "element 2: must be in 1..65535, not 70000"),
    ("gateway", "queue_num", "-1", "must be in 0..65535, not -1"),
    ("gateway", "queue_num", "65536", "must be in 0..65535, not 65536"),
    ("gateway", "workers", "0", "must be in 1..64, not 0"),
    ("gateway", "workers", "65", "must be in 1..64, not 65"),
    ("gateway", "pinhole_timeout", "0", "must be more than 0 (seconds), not 0.0"),
    ("gateway", "pinhole_timeout", "-5", "must be more than 0 (seconds), not -5.0"),
    ("gateway", "pinhole_timeout", "nan", "must be more than 0 (seconds), not nan"),
    ("gateway", "pinhole_timeout", "inf", "must be more than 0 (seconds), not inf"),
    ("gateway", "pinhole_timeout", "86400.5", "must be at most 86400 (seconds, one day), not 86400.5"),
    ("policy", "min_port", "0", "must be in 1..65535, not 0"),
    ("policy", "min_port", "65536", "must be in 1..65535, not 65536"),
    ("policy", "max_flows", "0", "must be at least 1, not 0"),
    ("policy", "max_pinholes", "-1", "must be at least 1, not -1"),
    ("policy", "max_pinholes_per_client", "0", "must be at least 1, not 0"),
    ("policy", "max_held_bytes", "0", "must be at least 1, not 0"),
    # unknown enum value
    ("gateway", "queue_backend", '"nftables"', 'must be one of auto, nft, iptables, not "nftables" '
                                                "(did you mean 'nft'?)"),
    ("log", "level", '"verbose"', 'must be one of debug, info, warning, error, not "verbose"'),
    ("log", "level", '"warn"', "(did you mean 'warning'?)"),
    # malformed strings
    ("audit", "file", '"audit.log"', 'must be "" (the log) or an absolute path, not "audit.log"'),
    ("metrics", "listen", '"::1:9121"', 'an IPv6 address needs brackets: [::1]:9121'),
    ("metrics", "listen", '"127.0.0.1"', "must be host:port"),
    ("metrics", "listen", '":9121"', "must be host:port"),
    ("metrics", "listen", '"127.0.0.1:0"', "port must be in 1..65535, not 0"),
    ("metrics", "listen", '"127.0.0.1:99999"', "port must be in 1..65535, not 99999"),
    ("metrics", "listen", '"127.0.0.1:http"', 'port must be a number, not "http"'),
    ("metrics", "listen", '"300.1.1.1:9121"', '"300.1.1.1" is not an IPv4 address'),
    ("metrics", "listen", '"[1.2.3.4]:9121"', '"1.2.3.4" is not an IPv6 address'),
    ("metrics", "listen", '"[::1]9121"', "must be [IPv6]:port"),
    ("metrics", "listen", '"bad_host:9121"', "neither an IPv4 address nor a host name"),
    ("status", "socket", '"@"', 'an abstract socket needs a name after "@"'),
    ("status", "socket", '"ftpalg.sock"', 'must be "@name" (abstract) or an absolute path'),
    ("status", "socket", '"/' + "x" * 107 + '"', "is longer than 107 bytes"),
    ("status", "socket", '"@a\\u0000b"', "must not contain a NUL character"),
    ("nat64", "pool", '"192.168.255.0/33"', "is not an IPv4 network"),
    ("nat64", "pool", "[24]", "must be an IPv4 network as a string, not an integer"),
    ("nat64", "pool", '["2001:db8::/96"]', "is not an IPv4 network"),
    ("nat64", "prefix", '"2001:db8::/80"', "/80 is not a length RFC 6052"),
    ("nat64", "prefix", '"192.168.0.0/16"', "is not an IPv6 prefix"),
]


@pytest.mark.parametrize("section, key, value, problem", BAD)
def test_bad_values_name_file_key_and_problem(tmp_path, section, key, value, problem):
    e = file_error(tmp_path, "# a comment\n" + toml(section, key, value))
    assert e.key == f"{section}.{key}"
    assert problem in e.problem
    assert f": {section}.{key}: " in str(e)


def test_every_key_has_a_bad_value_and_a_good_one():
    assert {f"{s}.{k}" for s, k, *_ in BAD} == set(config.KEYS)
    assert {f"{s}.{k}" for s, k, *_ in GOOD} == set(config.KEYS)


def test_error_message_format(tmp_path):
    e = file_error(tmp_path, "[policy]\nmin_port = 0\n")
    assert str(e) == f"{tmp_path / 'bad.toml'}: policy.min_port: must be in 1..65535, not 0"


@pytest.mark.parametrize("text, key, problem", [
    ("[polciy]\nmin_port = 2\n", "polciy", "unknown section (did you mean policy?)"),
    ("[gateway]\nmin_port = 2\n", "gateway.min_port", "unknown key (did you mean policy.min_port?)"),
    ("[policy]\nmax_flow = 2\n", "policy.max_flow", "unknown key (did you mean policy.max_flows?)"),
    ("[policy]\nfoo = 2\n", "policy.foo", "unknown key"),
    ("min_port = 2\n", "min_port", "unknown key (did you mean policy.min_port?)"),
    ("verbose = true\n", "verbose", "unknown key (keys belong in a section)"),
    ("[extra]\n", "extra", "unknown section"),
    ("gateway = 5\n", "gateway", "must be a table ([gateway]), not an integer (5)"),
    ("[[gateway]]\nqueue_num = 1\n", "gateway", "must be a table ([gateway]), not an array"),
])
def test_unknown_keys_and_sections_are_refused(tmp_path, text, key, problem):
    e = file_error(tmp_path, text)
    assert (e.key, e.problem) == (key, problem)


def test_invalid_toml_and_unreadable_files(tmp_path):
    e = file_error(tmp_path, "[gateway]\nqueue_num = = 1\n")
    assert e.key is None and e.problem.startswith("not valid TOML: ") and "line 2" in e.problem
    with pytest.raises(ConfigError, match=r"^/nonexistent/ftpalg.toml: cannot read: No such file"):
        config.load("/nonexistent/ftpalg.toml")
    (tmp_path / "latin1.toml").write_bytes(b"# \xe9\n")
    with pytest.raises(ConfigError, match="cannot read"):
        config.load(tmp_path / "latin1.toml")


# ---- options: the same checks, and precedence ---------------------------------------------------
def parse(*argv: str):
    return cli.config_from_args(cli.parser().parse_args(list(argv)))


def test_old_options_still_work_and_land_in_config():
    c = parse("run", "--control-port", "21", "--control-port", "2121", "--queue-num", "7",
              "--queue-backend", "iptables", "--no-rules", "--pinhole-timeout", "30", "--min-port", "1",
              "--max-flows", "10", "--max-pinholes", "20", "--max-pinholes-per-client", "3",
              "--max-held-bytes", "4096", "--log-level", "debug")
    assert c.gateway == config.Gateway((21, 2121), 7, "iptables", False, 30.0)
    assert c.limits() == Limits(1, 10, 20, 3, 4096)
    assert c.log.level == "debug"
    assert parse("--log-level", "warning", "run").log.level == "warning"  # before the command, too
    assert parse("run").gateway == Config().gateway


def test_new_options_land_in_config():
    c = parse("run", "--metrics-listen", "[::1]:9200", "--status-socket", "/run/ftpalg.sock", "--audit")
    assert (c.metrics.listen, c.status.socket, c.audit.enabled, c.audit.file) == (
        "[::1]:9200", "/run/ftpalg.sock", True, "")
    assert c.metrics.address == ("::1", 9200) and c.status.address == "/run/ftpalg.sock"
    assert Config().status.address == "\0ftpalg-status" and Config().metrics.address == ("127.0.0.1", 9121)
    assert parse("run", "--metrics-listen", "").metrics.address is None
    c = parse("run", "--audit-file", "/var/log/a.log")
    assert (c.audit.enabled, c.audit.file) == (True, "/var/log/a.log")
    c = parse("run", "--no-audit", "--audit-file", "/var/log/a.log")
    assert (c.audit.enabled, c.audit.file) == (False, "/var/log/a.log")


def test_options_given_override_the_file_options_not_given_do_not(tmp_path):
    f = tmp_path / "f.toml"
    f.write_text("[gateway]\ncontrol_ports = [2121]\nqueue_num = 7\ninstall_rules = false\n"
                 "[policy]\nmin_port = 2000\nmax_flows = 50\n[log]\nlevel = \"warning\"\n[audit]\nenabled = true\n")
    c = parse("run", "--config", str(f))
    assert (c.gateway.control_ports, c.gateway.queue_num, c.gateway.install_rules) == ((2121,), 7, False)
    assert (c.policy.min_port, c.policy.max_flows, c.log.level, c.audit.enabled) == (2000, 50, "warning", True)
    c = parse("run", "--config", str(f), "--control-port", "21", "--min-port", "3000", "--rules",
              "--log-level", "debug", "--no-audit")
    assert (c.gateway.control_ports, c.gateway.queue_num, c.gateway.install_rules) == ((21,), 7, True)
    assert (c.policy.min_port, c.policy.max_flows, c.log.level, c.audit.enabled) == (3000, 50, "debug", False)
    assert c.source == str(f)
    assert c.origins["policy.min_port"] == "--min-port" and c.origins["policy.max_flows"] == str(f)
    assert c.origins["gateway.install_rules"] == "--rules"


def test_default_file_is_read_when_present_and_named(tmp_path):
    assert parse("run").source == f"built-in defaults (no {config.DEFAULT_PATH})"
    config.DEFAULT_PATH.write_text("[policy]\nmin_port = 5000\n")
    c = parse("run")
    assert c.policy.min_port == 5000 and c.source == str(config.DEFAULT_PATH)
    assert parse("run", "--config", "/dev/null").policy.min_port == 1024  # the way around it
    with pytest.raises(ConfigError, match="cannot read"):
        parse("run", "--config", str(tmp_path / "missing.toml"))  # named: must exist


# The same value given in a file and as an option: the same key, the same problem.
SAME = [
    ("--pinhole-timeout", "-5", "gateway", "pinhole_timeout", "-5"),
    ("--pinhole-timeout", "1e9", "gateway", "pinhole_timeout", "1e9"),
    ("--control-port", "70000", "gateway", "control_ports", "[70000]"),
    ("--control-port", "0", "gateway", "control_ports", "[0]"),
    ("--queue-num", "65536", "gateway", "queue_num", "65536"),
    ("--queue-backend", "nftables", "gateway", "queue_backend", '"nftables"'),
    ("--min-port", "0", "policy", "min_port", "0"),
    ("--max-flows", "0", "policy", "max_flows", "0"),
    ("--max-pinholes", "-3", "policy", "max_pinholes", "-3"),
    ("--max-pinholes-per-client", "0", "policy", "max_pinholes_per_client", "0"),
    ("--max-held-bytes", "0", "policy", "max_held_bytes", "0"),
    ("--log-level", "verbose", "log", "level", '"verbose"'),
    ("--audit-file", "rel.log", "audit", "file", '"rel.log"'),
    ("--metrics-listen", "::1:9121", "metrics", "listen", '"::1:9121"'),
    ("--status-socket", "@", "status", "socket", '"@"'),
]


@pytest.mark.parametrize("option, text, section, key, value", SAME)
def test_an_option_gets_the_same_error_as_the_file(tmp_path, option, text, section, key, value):
    from_file = file_error(tmp_path, toml(section, key, value))
    with pytest.raises(ConfigError) as e:
        parse("run", option, text)
    assert (e.value.origin, e.value.key, e.value.problem) == (option, from_file.key, from_file.problem)
    assert str(e.value) == f"{option}: {section}.{key}: {from_file.problem}"


@pytest.mark.parametrize("option, text, problem", [
    ("--min-port", "abc", 'must be an integer, not "abc"'),
    ("--queue-num", "1.5", 'must be an integer, not "1.5"'),
    ("--pinhole-timeout", "soon", 'must be a number of seconds, not "soon"'),
    ("--control-port", "21,x", 'element 2: must be an integer, not "x"'),
])
def test_option_text_that_is_not_a_number(option, text, problem):
    with pytest.raises(ConfigError) as e:
        parse("run", option, text)
    assert e.value.problem == problem


def test_control_port_option_accepts_lists_and_merges_duplicates():
    assert parse("run", "--control-port", "2121,21", "--control-port", "21").gateway.control_ports == (21, 2121)


def test_options_are_text_until_checked():
    """argparse does no checking of its own: every option default is None (not given)."""
    args = cli.parser().parse_args(["run"])
    for dest in cli.OPTION_KEYS:
        assert getattr(args, dest, None) is None, dest
    assert cli.option_overrides(args) == {}
    assert config.check("policy.min_port", OptionText("80"), "--min-port") == 80
    with pytest.raises(ConfigError):
        config.check("policy.min_port", "80", "file")  # a string in a file is not a number


# ---- main: exit codes, check-config, rules ----------------------------------------------------------
def test_run_with_a_bad_option_or_file_exits_2_before_doing_anything(tmp_path, capsys):
    assert cli.main(["run", "--pinhole-timeout", "-5"]) == 2
    err = capsys.readouterr().err
    assert err == "ftpalg: --pinhole-timeout: gateway.pinhole_timeout: must be more than 0 (seconds), not -5.0\n"
    assert cli.main(["run", "--control-port", "70000"]) == 2
    assert "gateway.control_ports: must be in 1..65535, not 70000" in capsys.readouterr().err
    (tmp_path / "f.toml").write_text("[policy]\nmax_flows = 0\n")
    assert cli.main(["run", "--config", str(tmp_path / "f.toml")]) == 2
    assert "f.toml: policy.max_flows: must be at least 1, not 0" in capsys.readouterr().err
    assert cli.main(["--log-level", "loud", "lab", "down"]) == 2  # checked for every command


def test_check_config_prints_every_key_with_sources_and_reads_back(tmp_path, capsys):
    f = tmp_path / "f.toml"
    f.write_text('[policy]\nmin_port = 2000\n[metrics]\nlisten = "[::1]:9200"\n[status]\nsocket = "@x\\"y"\n')
    assert cli.main(["check-config", str(f), "--max-flows", "99"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    data = tomllib.loads(out)
    assert {f"{s}.{k}" for s, t in data.items() for k in t} == set(config.KEYS)
    assert from_toml(out) == dataclasses.replace(from_toml(f.read_text()), policy=dataclasses.replace(
        from_toml(f.read_text()).policy, max_flows=99))
    assert out.startswith(f"# ftpalg configuration: {f}\n")
    assert f"min_port = 2000  # from {f}\n" in out and "max_flows = 99  # from --max-flows\n" in out
    assert "max_pinholes = 4096\n" in out  # defaults: no comment


def test_check_config_defaults_equal_the_deploy_file(capsys):
    assert cli.main(["check-config"]) == 0
    assert from_toml(capsys.readouterr().out) == config.load(DEPLOY) == Config()


def test_check_config_error_goes_to_stderr_and_exits_2(tmp_path, capsys):
    f = tmp_path / "f.toml"
    f.write_text("[gateway]\ncontrol_ports = [21, 0]\n")
    assert cli.main(["check-config", str(f)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == f"ftpalg: {f}: gateway.control_ports: element 2: must be in 1..65535, not 0\n"
    assert cli.main(["check-config", str(tmp_path / "missing.toml")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_check_config_reads_the_default_file(capsys):
    config.DEFAULT_PATH.write_text("[gateway]\nqueue_num = 9\n")
    assert cli.main(["check-config"]) == 0
    assert f"queue_num = 9  # from {config.DEFAULT_PATH}" in capsys.readouterr().out


def test_rules_follow_the_config_file_and_options(tmp_path, capsys):
    f = tmp_path / "f.toml"
    f.write_text("[gateway]\ncontrol_ports = [2121, 21]\nqueue_num = 7\n")
    assert cli.main(["rules", "nft-queue", "--config", str(f)]) == 0
    assert capsys.readouterr().out == nft_rules([21, 2121], 7)
    assert cli.main(["rules", "queue-iptables", "--config", str(f), "--queue-num", "8"]) == 0
    assert capsys.readouterr().out == iptables_queue_rules([21, 2121], 8, 4, selected=True)  # the default
    assert cli.main(["rules", "queue-iptables", "--config", str(f), "--queue", "all"]) == 0
    assert capsys.readouterr().out == iptables_queue_rules([21, 2121], 7, 4)
    config.DEFAULT_PATH.write_text("[gateway]\nqueue_num = 9\n")
    assert cli.main(["rules", "nft-queue"]) == 0
    assert capsys.readouterr().out == nft_rules([21], 9)
    assert cli.main(["rules", "nft", "--control-port", "99999"]) == 2


# ---- what serve is given ------------------------------------------------------------------------
def test_alg_arguments():
    c = parse("run", "--control-port", "21", "--control-port", "2121", "--pinhole-timeout", "30",
              "--min-port", "1", "--max-pinholes-per-client", "5")
    alg = Driven(FakeKernel(), **c.alg_kwargs())
    assert alg.control_ports == frozenset({21, 2121}) and alg.pinhole_timeout == 30.0
    assert alg.limits == Limits(min_port=1, max_pinholes_per_client=5)
    default = Driven(FakeKernel(), **Config().alg_kwargs())
    plain = Driven(FakeKernel())
    assert (default.control_ports, default.pinhole_timeout, default.limits) == (
        plain.control_ports, plain.pinhole_timeout, plain.limits)


class Recorder:
    """Stands in for the Linux classes serve and engine build; records how it was called."""

    calls: dict[str, tuple] = {}

    def __init__(self, name):
        self.name = name

    def __call__(self, *args, **kw):
        Recorder.calls[self.name] = (args, kw)
        return self

    def install(self):
        return "nft"

    def run(self, ready=None):  # the queue loop: bound (systemd told), served, then stopped
        if ready is not None:
            ready()

    def __getattr__(self, attr):
        return lambda *a, **k: None


def fake_linux(monkeypatch, queue_chains=True):
    from ftpalg.linux import engine, serve

    Recorder.calls = {}

    def alg(kernel, **kw):
        Recorder.calls["Alg"] = ((), kw)
        return Driven(FakeKernel(), **kw)

    monkeypatch.setattr(engine, "Alg", alg)
    for name in ("CtNetlink", "LinuxKernel", "ExpectationEvents"):
        monkeypatch.setattr(engine, name, Recorder(name))
    monkeypatch.setattr(serve, "QueueHandler", Recorder("QueueHandler"))
    monkeypatch.setattr(serve, "StaticRules", Recorder("StaticRules"))
    monkeypatch.setattr(serve, "queue_chains_present", lambda workers=1, selected=False: queue_chains)


def test_serve_builds_everything_from_the_config(tmp_path, monkeypatch):
    fake_linux(monkeypatch)
    f = tmp_path / "f.toml"
    f.write_text("[gateway]\ncontrol_ports = [2121, 21]\nqueue_num = 7\nqueue_backend = \"iptables\"\n"
                 "pinhole_timeout = 30\n[policy]\nmax_flows = 10\n")
    # no status socket, no metrics endpoint: this test runs in the host's namespace
    c = parse("run", "--config", str(f), "--min-port", "1", "--status-socket", "", "--metrics-listen", "")
    assert serve(c) == 0  # the fake queue "runs" until a stop
    calls = Recorder.calls
    assert calls["Alg"][1] == {"control_ports": frozenset({21, 2121}), "pinhole_timeout": 30.0,
                               "limits": Limits(min_port=1, max_flows=10), "selected": True, "audit": False,
                               "nat64": None}
    assert calls["StaticRules"][0] == (frozenset({21, 2121}), 7, "iptables", 1, True)
    assert calls["LinuxKernel"][0][1] == 30.0
    assert calls["QueueHandler"][0][1] == 7


def test_serve_without_rules(monkeypatch):
    fake_linux(monkeypatch)
    assert serve(parse("run", "--no-rules", "--status-socket", "", "--metrics-listen", "")) == 0
    assert "StaticRules" not in Recorder.calls and "QueueHandler" in Recorder.calls
    fake_linux(monkeypatch, queue_chains=False)
    with pytest.raises(RuleError, match=r"install_rules = false \(--no-rules\)"):
        serve(from_toml("[gateway]\ninstall_rules = false\n"))


def test_serve_without_cap_net_admin_says_what_it_needs(monkeypatch, caplog):
    """Selected mode joins the kernel's expectation events before it installs the rules:
    without CAP_NET_ADMIN that fails first, and says why as the rules would."""
    from ftpalg.linux import engine

    fake_linux(monkeypatch)

    def denied():
        raise PermissionError(errno.EPERM, os.strerror(errno.EPERM))

    monkeypatch.setattr(engine, "ExpectationEvents", denied)
    with caplog.at_level(logging.ERROR, logger="ftpalg"):
        assert serve(parse("run", "--status-socket", "", "--metrics-listen", "")) == 1
    assert "conntrack expectation events: Operation not permitted (ftpalg run needs CAP_NET_ADMIN" in caplog.text
    assert "QueueHandler" not in Recorder.calls


def test_run_logs_which_file_and_options_were_used(tmp_path, monkeypatch, caplog):
    served = []
    import ftpalg.linux.serve

    monkeypatch.setattr(ftpalg.linux.serve, "serve", lambda c: served.append(c) or 0)
    monkeypatch.setattr(cli.signal, "signal", lambda *a: None)
    monkeypatch.setattr(ftpalg.linux.serve, "single_instance", lambda: __import__("contextlib").nullcontext())
    f = tmp_path / "f.toml"
    f.write_text("[policy]\nmax_flows = 10\n")
    with caplog.at_level(logging.INFO, logger="ftpalg"):
        cli.main(["run", "--config", str(f), "--min-port", "1", "--no-rules"])
    assert f"configuration: {f}; overridden by --min-port --no-rules" in caplog.text
    assert served[0].limits() == Limits(min_port=1, max_flows=10)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ftpalg"):
        cli.main(["run"])
    assert f"configuration: built-in defaults (no {config.DEFAULT_PATH})" in caplog.text


def test_check_config_takes_the_file_either_way(tmp_path, capsys):
    f, g = tmp_path / "f.toml", tmp_path / "g.toml"
    f.write_text("[gateway]\nqueue_num = 9\n")
    g.write_text("")
    assert cli.main(["check-config", "--config", str(f)]) == 0
    assert "queue_num = 9  # from" in capsys.readouterr().out
    assert cli.main(["check-config", str(f), "--config", str(g)]) == 2
    assert "two files" in capsys.readouterr().err
