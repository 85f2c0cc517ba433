"""The generated files (ftpalg/docgen.py) are in step with the code: the manual pages
ftpalg(8) (from the argument parser, by argparse-manpage) and ftpalg.toml(5) (from the
configuration schema), and deploy/ftpalg.toml (from the same schema).

Each file is made again and compared byte for byte; besides, independently of the generator,
every option of every command is in ftpalg(8) and every key with its default in
ftpalg.toml(5), and man renders both pages without a warning."""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from needs import need

from ftpalg import cli, config, docgen, install

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("path", list(docgen.GENERATED), ids=lambda p: str(p.relative_to(ROOT)))
def test_generated_file_is_what_the_code_makes(path):
    made = docgen.GENERATED[path]()
    assert path.read_text() == made, (f"{path.relative_to(ROOT)} is not what the code makes now: run "
                                      "`.venv/bin/python -m ftpalg.docgen` and commit the result")


def commands(parser: argparse.ArgumentParser, name: str = "ftpalg") -> dict[str, argparse.ArgumentParser]:
    """Every command's parser by its full name, the top one included."""
    out = {name: parser}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, p in action.choices.items():
                out.update(commands(p, f"{name} {sub}"))
    return out


def text(roff: str) -> str:
    return roff.replace("\\-", "-").replace("\\fB", "").replace("\\fI", "").replace("\\fR", "").replace("\\,", "") \
        .replace("\\/", "")


def test_ftpalg_8_names_every_command_and_option():
    page = text((install.MAN_SOURCE / "ftpalg.8").read_text())
    parsers = commands(cli.parser())
    assert {"ftpalg run", "ftpalg check-config", "ftpalg install", "ftpalg explain"} <= set(parsers)
    for name, p in parsers.items():
        if name != "ftpalg":
            assert f".SS {name}\n" in page, name
        for action in p._actions:
            for option in action.option_strings:
                if option not in ("-h", "--help"):
                    assert re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", page), (name, option)
    for heading in docgen.SECTIONS_8:
        assert f".SH {heading}\n" in page


def test_ftpalg_toml_5_has_every_key_with_its_default_and_option():
    page = text((install.MAN_SOURCE / "ftpalg.toml.5").read_text())
    defaults = config.Config()
    options = {key: "--" + dest.replace("_", "-") for dest, key in cli.OPTION_KEYS.items()}
    options["gateway.install_rules"] = "--no-rules"
    for section in config.SECTIONS:
        assert f".SS [{section}]\n" in page, section
    for key in config.KEYS:
        block = page.split(f"\n{key.split('.')[1]} = {config.toml_value(defaults.get(key))}\n", 1)
        assert len(block) == 2, key
        entry = block[1].split(".TP", 1)[0]
        assert options[key] in entry, (key, entry)


def man(*args: str | Path) -> subprocess.CompletedProcess[str]:
    need(shutil.which("man"), "man (Debian package man-db)")
    return subprocess.run(["man", "--warnings", "-P", "cat", *map(str, args)], capture_output=True, text=True,
                          timeout=60, env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "MANWIDTH": "100"})


@pytest.mark.parametrize("page", install.MAN_PAGES)
def test_man_renders_the_page_without_warnings(page):
    res = man("-l", install.MAN_SOURCE / page)
    assert res.returncode == 0 and res.stderr == "", res.stderr
    first = res.stdout.splitlines()[0]
    assert first.startswith(page.rsplit(".", 1)[0].upper() + f"({page.rsplit('.', 1)[1]})"), first
    assert "ftpalg" in res.stdout and "SEE ALSO" in res.stdout


def test_check_reports_a_stale_file(monkeypatch, capsys):
    path = install.MAN_SOURCE / "ftpalg.toml.5"
    monkeypatch.setattr(docgen, "GENERATED", {path: lambda: "something else\n"})
    assert docgen.main(["--check"]) == 1
    assert capsys.readouterr().out == "ftpalg/man/ftpalg.toml.5: differs from what the code makes (python -m " \
                                      "ftpalg.docgen)\n"
    assert path.read_text() != "something else\n"  # --check writes nothing
