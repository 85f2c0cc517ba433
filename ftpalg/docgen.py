"""Files generated from the code, so that nothing in them is written twice by hand.

* ``ftpalg/man/ftpalg.8``: the commands and their options, from the argument parser
  (``cli.parser()``) by argparse-manpage, with the sections a parser does not hold (exit
  status, signals, files, see also) added through its ``add_section``;
* ``ftpalg/man/ftpalg.toml.5``: the configuration file, from its schema (``config.KEYS``:
  each key's description; ``Config()``: the defaults; the parser: the option that overrides
  each key);
* ``deploy/ftpalg.toml``: the default configuration, every key with its description, from
  the same schema.

They are committed: the wheel carries the manual pages as package data and the default
configuration as a data file, with no generator at build time; ``tests/test_docgen.py``
regenerates them and compares. After changing an option, a key or its description::

    .venv/bin/python -m ftpalg.docgen           # rewrite the three files
    .venv/bin/python -m ftpalg.docgen --check   # only say which differ (exit 1)

Only ``ftpalg(8)`` needs argparse-manpage (the ``test`` extra); it is imported when that
page is made, never by ``ftpalg`` itself.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

from . import __version__
from .config import DEFAULT_PATH, KEYS, Config, toml_value
from .install import MAN_SOURCE

ROOT = Path(__file__).resolve().parent.parent
NAME = "FTP-aware NAT application-level gateway for Linux"
WIDTH = 1000  # argparse's wrapping off: man fills the lines itself (a narrower one breaks words at hyphens)


def roff(text: str) -> str:
    """Plain text as roff text lines: backslashes and hyphens escaped, a line that would start
    with a control character (``.`` or ``'``) guarded."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join("\\&" + line if line.startswith((".", "'")) else line for line in text.split("\n"))


def bold(text: str) -> str:
    return f"\\fB{roff(text)}\\fR"


# ---- ftpalg(8) --------------------------------------------------------------------------------
SECTIONS_8 = {
    "EXIT STATUS": f"""\
.TP
.B 0
{bold("ftpalg run")}: stopped by SIGTERM or SIGINT (also during start\\-up), its rules removed.
Every other command: done.
.TP
.B 1
{bold("ftpalg run")}: could not start (another process holds the queue, the rules cannot be
loaded), or its workers died more than 5 times within a minute; what it installed is removed.
{bold("ftpalg explain")}: a session in the capture failed. {bold("ftpalg install")}: nothing
could be written. {bold("ftpalg status")}: no ftpalg answers in this network namespace.
.TP
.B 2
The configuration (file or option) is wrong: the message names where the value came from, the
key and the problem, and nothing was touched. {bold("ftpalg explain")}: the file cannot be
explained.
.TP
.B 130
{bold("ftpalg demo")}, {bold("ftpalg lab faults")}: interrupted (Ctrl\\-C, SIGTERM), cleaned up.""",
    "SIGNALS": f"""\
.TP
.BR SIGTERM ", " SIGINT
Stop: the rules, the queue chains and the open pinholes are removed, and the ruleset is as it
was found. A stop during start\\-up is acted on between two steps, never half\\-way.
.TP
.B SIGUSR1
Stop for a restart (systemd's {bold("RestartKillSignal=")}): the rules and the pinholes stay
in the kernel, and control segments that need ftpalg wait up to 5 s for the next
{bold("ftpalg run")} instead of passing unrewritten.""",
    "FILES": f"""\
.TP
{bold(str(DEFAULT_PATH))}
The configuration, read by {bold("ftpalg run")} if it exists; see
.BR ftpalg.toml (5).
.TP
{bold("/etc/systemd/system/ftpalg.service")}
The systemd unit {bold("ftpalg install")} writes.
.TP
{bold("/etc/ftpalg/rules/")}
The rule files {bold("ftpalg run")} would install, for {bold("--no-rules")} (as
{bold("ftpalg rules")} prints them).
.TP
{bold("@ftpalg-status")}, {bold("@ftpalg-run")}
Abstract unix sockets, one of each per network namespace: {bold("ftpalg status")} asks the
first; the second keeps a second {bold("ftpalg run")} out of the namespace.""",
    "SEE ALSO": """\
.BR ftpalg.toml (5),
.BR conntrack (8),
.BR nft (8),
.BR iptables (8),
.BR systemd.service (5).
The documentation in ftpalg's source (README.md and docs/) explains how it works, its
security model, deploying, operations and its limits.""",
}


@contextlib.contextmanager
def _columns(width: int) -> Iterator[None]:
    """argparse wraps help to the terminal's width (``COLUMNS``): a fixed one while a page
    is made, so that the page does not depend on where it was made."""
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(width)
    try:
        yield
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old


def ftpalg_8() -> str:
    from argparse_manpage.manpage import Manpage  # the generator: only here

    from .cli import parser

    with _columns(WIDTH):
        page = Manpage(parser(), format="single-commands-section")
        page.date = ""  # no date: the page changes only when the code does
        page.source = f"ftpalg {__version__}"
        page.manual = "System Manager's Manual"
        page.section = 8
        page.description = NAME
        for heading, content in SECTIONS_8.items():
            page.add_section(heading, "=", content)
        return str(page)


# ---- ftpalg.toml(5) and deploy/ftpalg.toml: the configuration schema ---------------------------
def key_options() -> dict[str, list[str]]:
    """key -> the options of ``ftpalg run`` that set it (``--control-port (repeatable)``),
    read from the parser."""
    from .cli import OPTION_KEYS, parser

    sub = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction))
    out: dict[str, list[str]] = {}
    for action in sub.choices["run"]._actions:
        key = OPTION_KEYS.get(action.dest)
        if key is not None:
            repeat = " (repeatable)" if isinstance(action, argparse._AppendAction) else ""
            out.setdefault(key, []).extend(o + repeat for o in action.option_strings)
    return out


def _sections() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for key in KEYS:
        out.setdefault(key.split(".")[0], []).append(key)
    return out


TOML_5_DESCRIPTION = f"""\
{bold("ftpalg run")} reads {bold(str(DEFAULT_PATH))} if it exists, else uses the built\\-in
defaults; {bold("--config")} \\fIFILE\\fR names another file, which must exist. The file is
TOML: the sections and keys below, each shown with its default. A key the file leaves out
keeps its default; an option given on the command line overrides the file's value
({bold("--control-port")} replaces the file's list).
.PP
Values from the file and from options go through the same checks: type, range, enumerations;
unknown sections and keys are refused, with a \\(lqdid you mean\\(rq when one is close. The error
names where the value came from, the key and the problem, and {bold("ftpalg run")} exits with
status 2 before touching anything.
{bold("ftpalg check-config")} [\\fIFILE\\fR] [\\fIoptions\\fR] prints the effective
configuration as TOML, each value not at its default followed by where it came from."""


def ftpalg_toml_5() -> str:
    defaults, options = Config(), key_options()
    out = [f'.TH FTPALG.TOML 5 "" "ftpalg {__version__}" "File Formats Manual"',
           ".SH NAME", roff(f"ftpalg.toml - configuration of ftpalg(8), the {NAME}"),
           ".SH SYNOPSIS", bold(str(DEFAULT_PATH)),
           ".SH DESCRIPTION", TOML_5_DESCRIPTION]
    out.append(".SH KEYS")
    for section, keys in _sections().items():
        out.append(f".SS [{section}]")
        for key in keys:
            name = key.split(".")[1]
            out += [".TP", f"{bold(name)} = {roff(toml_value(defaults.get(key)))}", roff(KEYS[key].doc)]
            if key in options:
                out += [".br", f"Option{'s' if len(options[key]) > 1 else ''}: "
                        + ", ".join(_option(o) for o in options[key]) + "."]
    out += [".SH EXAMPLE", "A gateway whose FTP server is also reached on a forwarded port 2121, with the audit "
            "log on:",
            ".PP", ".nf", ".RS 4", roff('[gateway]\ncontrol_ports = [21, 2121]\n\n[audit]\nenabled = true\n'
                                         'file = "/var/log/ftpalg/audit.jsonl"'), ".RE", ".fi",
            ".SH FILES", f".TP\n{bold(str(DEFAULT_PATH))}\nThe configuration {bold('ftpalg run')} reads if it "
            f"exists; {bold('ftpalg install')} writes it with every key at its default, only if there is none.",
            ".SH SEE ALSO", ".BR ftpalg (8)"]
    return "\n".join(out) + "\n"


def _option(text: str) -> str:
    option, _, rest = text.partition(" ")
    return bold(option) + (" " + roff(rest) if rest else "")


DEPLOY_HEADER = f"""\
# ftpalg configuration: copy to {DEFAULT_PATH} (read by `ftpalg run` when it exists;
# another file: `ftpalg run --config FILE`). Every key is shown with its default; a key left
# out keeps its default. Options on the command line override this file.
# `ftpalg check-config [FILE]` checks a file and prints the effective configuration.
# (Made from ftpalg/config.py by `python -m ftpalg.docgen`; `man ftpalg.toml` says the same.)
"""


def deploy_toml() -> str:
    defaults, options = Config(), key_options()
    out = [DEPLOY_HEADER.rstrip("\n")]
    for section, keys in _sections().items():
        out += ["", f"[{section}]"]
        for key in keys:
            opts = options.get(key)
            text = KEYS[key].doc + (f" Option{'s' if len(opts) > 1 else ''}: {', '.join(opts)}." if opts else "")
            out += textwrap.wrap(text, 92, initial_indent="# ", subsequent_indent="# ", break_on_hyphens=False)
            out.append(f"{key.split('.')[1]} = {toml_value(defaults.get(key))}")
    return "\n".join(out) + "\n"


GENERATED: dict[Path, Callable[[], str]] = {
    MAN_SOURCE / "ftpalg.8": ftpalg_8,
    MAN_SOURCE / "ftpalg.toml.5": ftpalg_toml_5,
    ROOT / "deploy" / "ftpalg.toml": deploy_toml,
}


def stale() -> list[Path]:
    """The generated files that differ from what the code makes now."""
    return [p for p, make in GENERATED.items() if not p.exists() or p.read_text() != make()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ftpalg.docgen", description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 if a file differs")
    args = ap.parse_args(argv)
    if not (ROOT / "pyproject.toml").is_file():
        print(f"{ap.prog}: not in a source checkout ({ROOT}): the files it makes belong to one", file=sys.stderr)
        return 2
    paths = stale()
    for path in paths:
        if args.check:
            print(f"{path.relative_to(ROOT)}: differs from what the code makes (python -m ftpalg.docgen)")
        else:
            path.parent.mkdir(exist_ok=True)
            path.write_text(GENERATED[path]())
            print(f"wrote {path.relative_to(ROOT)}")
    return 1 if args.check and paths else 0


if __name__ == "__main__":
    sys.exit(main())
