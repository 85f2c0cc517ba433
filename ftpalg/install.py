"""``ftpalg install``: put this installation's systemd unit, default configuration and rule
files in place.

The files come from ``deploy/`` (the source of truth): in a wheel they are data files that pip
puts in the installation's data directory (``share/ftpalg/`` of a venv), found through the
wheel's RECORD; running from a source checkout, they are read from its ``deploy/``.

* ``/etc/systemd/system/ftpalg.service``: the unit, with ``ExecStart=`` pointing at THIS
  installation's ``ftpalg`` (the console script next to ``sys.executable``);
* ``/etc/ftpalg/ftpalg.toml``: the default configuration, only if there is none (an admin's
  configuration is never overwritten);
* ``/etc/ftpalg/rules/``: the rule files, for ``--no-rules`` (what ``ftpalg rules ...`` prints
  for the default configuration);
* ``/usr/local/share/man/man8/ftpalg.8``, ``.../man5/ftpalg.toml.5``: the manual pages, package
  data of ftpalg (made by ``ftpalg/docgen.py``), where ``man ftpalg`` finds them.

A unit, rule file or manual page that exists and differs is kept unless ``--force``. ``--root DIR`` writes
under a staging directory, ``--dry-run`` only says what would be done. The unit runs ftpalg
as a dynamic user (neither owner nor group of anything): every file of this installation must
be readable by others, and outside the directories the unit hides (``ProtectHome``,
``PrivateTmp``); what is not is reported loudly with the fix.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import re
import stat
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import __version__
from .config import DEFAULT_PATH

UNIT = Path("/etc/systemd/system/ftpalg.service")
CONFIG = DEFAULT_PATH
RULES_DIR = Path("/etc/ftpalg/rules")
RULE_FILES = ("ftpalg.nft", "ftpalg-queue.nft", "queue.iptables", "queue.ip6tables")
DEPLOY_FILES = ("ftpalg.service", "ftpalg.toml", *RULE_FILES)
MAN_DIR = Path("/usr/local/share/man")  # in man-db's search path (manpath.config), outside the package manager's
MAN_SOURCE = Path(__file__).resolve().parent / "man"  # package data
MAN_PAGES = ("ftpalg.8", "ftpalg.toml.5")
# What the unit hides from the service, whatever the permissions (see deploy/ftpalg.service).
HIDDEN = {Path("/root"): "ProtectHome=yes", Path("/home"): "ProtectHome=yes", Path("/run/user"): "ProtectHome=yes",
          Path("/tmp"): "PrivateTmp=yes", Path("/var/tmp"): "PrivateTmp=yes", Path("/dev"): "PrivateDevices=yes"}
RUNTIME_PACKAGES = ("netfilterqueue", "prometheus_client")  # imported by `ftpalg run` only
NEXT = ("systemctl daemon-reload && systemctl enable --now ftpalg", "systemctl status ftpalg",
        "journalctl -u ftpalg -f")


class InstallError(Exception):
    """Nothing (more) can be installed: the message says why."""


# ---- what is installed, from where -----------------------------------------------------------
def deploy_dir() -> Path:
    """The directory holding this installation's deploy files."""
    checkout = Path(__file__).resolve().parent.parent / "deploy"
    if all((checkout / n).is_file() for n in DEPLOY_FILES):
        return checkout  # running from a source tree (or an editable install)
    try:
        dist = importlib.metadata.distribution("ftpalg")
    except importlib.metadata.PackageNotFoundError:
        dist = None
    for f in (dist.files or []) if dist is not None else []:
        if f.name == "ftpalg.service" and f.parent.name == "ftpalg" and f.parent.parent.name == "share":
            d = Path(os.path.abspath(str(dist.locate_file(f)))).parent  # type: ignore[union-attr]
            if all((d / n).is_file() for n in DEPLOY_FILES):
                return d
    raise InstallError("this installation has no deploy files (share/ftpalg/ftpalg.service): install ftpalg "
                       "from its wheel (pip install ftpalg-*.whl), or run it from a source checkout")


def ftpalg_command() -> list[str]:
    """How the unit starts this installation's ftpalg: its console script (the one running,
    else the one next to this interpreter), else this interpreter with ``-m ftpalg``."""
    candidates = [Path(sys.argv[0])] if Path(sys.argv[0]).name == "ftpalg" else []
    candidates += [Path(sys.executable).parent / "ftpalg", Path(sysconfig.get_path("scripts")) / "ftpalg"]
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return [os.path.abspath(c)]
    return [os.path.abspath(sys.executable), "-m", "ftpalg"]


def systemd_word(word: str) -> str:
    """``word`` as one word of a unit's command line (specifiers and variables escaped)."""
    word = word.replace("%", "%%").replace("$", "$$")
    if re.fullmatch(r"[^\s\"'\\;]+", word):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


def unit_text(template: str, command: list[str]) -> str:
    """deploy/ftpalg.service with ``ExecStart=`` running ``command run``."""
    line = "ExecStart=" + " ".join(systemd_word(w) for w in [*command, "run"])
    text, n = re.subn(r"(?m)^ExecStart=.*$", lambda _: line, template)
    if n != 1:
        raise InstallError(f"the unit template has {n} ExecStart= lines, not 1")
    return f"# Written by `ftpalg install` (ftpalg {__version__}): ExecStart= is that installation's ftpalg.\n" + text


def man_path(page: str) -> Path:
    """Where a manual page goes: ``ftpalg.toml.5`` in ``man5/``."""
    return MAN_DIR / f"man{page.rsplit('.', 1)[1]}" / page


# ---- can the service's user read this installation? ----------------------------------------
def _inside(path: Path, top: Path) -> bool:
    return path == top or top in path.parents


def hidden_by_unit(path: Path) -> tuple[Path, str, Path] | None:
    """The directory the unit hides ``path`` (or its target) in, the setting that does, and
    the path (or target) in it."""
    for p in (Path(os.path.abspath(path)), path.resolve()):
        for top, option in HIDDEN.items():
            if _inside(p, top):
                return top, option, p
    return None


def service_cannot_read(path: Path, execute: bool = False) -> str | None:
    """Why the unit's dynamic user (others, for every file here) cannot use ``path`` (read it;
    list it if a directory; run it if ``execute``), through its symbolic links; None if it can."""
    hidden = hidden_by_unit(path)
    if hidden is not None:
        top, option, p = hidden
        target = f" (-> {p})" if p != Path(os.path.abspath(path)) else ""
        return f"{path}{target} is under {top}, which the unit hides from the service ({option})"
    for p in dict.fromkeys((Path(os.path.abspath(path)), path.resolve())):
        try:
            for d in reversed(p.parents):
                mode = d.stat().st_mode
                if not mode & stat.S_IXOTH:
                    return f"{d} is {stat.filemode(mode)}: others may not enter it"
            mode = p.stat().st_mode
        except OSError as e:
            return f"{p}: {e.strerror}"
        need = stat.S_IROTH | (stat.S_IXOTH if execute or stat.S_ISDIR(mode) else 0)
        if mode & need != need:
            return f"{p} is {stat.filemode(mode)}: others may not {'run' if execute else 'read'} it"
    return None


def _interpreter(script: Path) -> Path | None:
    """The interpreter of a console script (``#!/opt/ftpalg/bin/python3``)."""
    try:
        with script.open("rb") as f:
            first = f.readline(4096)
    except OSError:
        return None
    m = re.match(rb"#!\s*(\S+)", first)
    return Path(os.fsdecode(m.group(1))) if m and b"python" in m.group(1) else None


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def readability_problems(command: list[str]) -> list[str]:
    """What the service's user could not read or run, first problem per item."""
    items: list[tuple[Path, bool]] = [(Path(command[0]), True)]
    interp = _interpreter(Path(command[0]))
    if interp is not None:
        items.append((interp, True))
    items.append((Path(sys.executable), True))
    if sys.prefix != sys.base_prefix:
        items.append((Path(sys.prefix) / "pyvenv.cfg", False))
    items.append((Path(sysconfig.get_path("stdlib")), False))
    own = Path(__file__).resolve().parent
    items += [(own.parent, False), (own, False)]
    problems: list[str] = []
    hidden: set[Path] = set()  # one line per hidden directory, not one per file in it

    def check(path: Path, execute: bool = False) -> bool:
        top = hidden_by_unit(path)
        if top is not None and top[0] in hidden:
            return False
        why = service_cannot_read(path, execute)
        if why is not None:
            problems.append(why)
            if top is not None:
                hidden.add(top[0])
        return why is None

    for path, execute in dict.fromkeys(items):
        check(path, execute)
    for name in ("ftpalg", *RUNTIME_PACKAGES):  # every file of each package, as umask 077 would leave it
        d = own if name == "ftpalg" else _package_dir(name)
        if d is None or not check(d):
            continue
        for dirpath, dirnames, filenames in os.walk(d):
            dirnames[:] = [n for n in dirnames if n != "__pycache__"]
            if not all(check(Path(dirpath, n)) for n in [*dirnames, *filenames]):
                break
    return list(dict.fromkeys(problems))


# ---- writing --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Item:
    path: Path  # where it belongs on the gateway (/etc/...)
    text: str
    never_replace: bool  # the configuration: an admin's file


def _staged(root: Path, path: Path) -> Path:
    return root / path.relative_to("/")


def _writable_dir(path: Path) -> str | None:
    """Why files cannot be created in ``path`` (or in the directories that would hold it)."""
    d = path
    while not d.exists():
        d = d.parent
    if not d.is_dir():
        return f"{d} is not a directory"
    if not os.access(d, os.W_OK | os.X_OK):
        return f"{d}: permission denied"
    return None


def _write(path: Path, text: str) -> None:
    for d in reversed([path.parent, *path.parent.parents]):
        if not d.exists():
            d.mkdir()
            d.chmod(0o755)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def cmd_install(args: argparse.Namespace) -> int:
    try:
        return _install(args)
    except (InstallError, OSError) as e:
        print(f"ftpalg install: {e}", file=sys.stderr)
        return 1


def _install(args: argparse.Namespace) -> int:
    root = Path(args.root).resolve() if args.root else Path("/")
    src = deploy_dir()
    command = ftpalg_command()
    items = [Item(UNIT, unit_text((src / "ftpalg.service").read_text(), command), False),
             Item(CONFIG, (src / "ftpalg.toml").read_text(), True),
             *(Item(RULES_DIR / n, (src / n).read_text(), False) for n in RULE_FILES),
             *(Item(man_path(n), (MAN_SOURCE / n).read_text(), False) for n in MAN_PAGES)]
    plan: list[tuple[Item, Path, str, str]] = []  # item, where, action, note
    for it in items:
        where = _staged(root, it.path)
        if where.is_symlink() or (where.exists() and not where.is_file()):
            plan.append((it, where, "keep", "not a regular file (a masked unit is a link to /dev/null): left alone"))
            continue
        old = where.read_text(errors="replace") if where.exists() else None
        if old is None:
            plan.append((it, where, "write", ""))
        elif old == it.text:
            plan.append((it, where, "unchanged", ""))
        elif it.never_replace:
            plan.append((it, where, "keep", "exists: a configuration is never overwritten "
                                            f"(this version's defaults: {src / 'ftpalg.toml'})"))
        elif args.force:
            plan.append((it, where, "replace", "differed (--force)"))
        else:
            plan.append((it, where, "keep", "exists and differs: --force replaces it"))
    todo = [(it, where) for it, where, action, _ in plan if action in ("write", "replace")]
    if not args.dry_run:
        for _, where in todo:
            why = _writable_dir(where.parent) or (
                f"{where}: permission denied" if where.exists() and not os.access(where, os.W_OK) else None)
            if why is not None:
                raise InstallError(f"cannot write {where} ({why}); nothing was written. Run it as root "
                                   f"(sudo {command[0]} install), or stage the files with --root DIR")

    out = sys.stdout
    print(f"ftpalg {__version__}: {' '.join(command)} (deploy files from {src})"
          + (" -- dry run, nothing is written" if args.dry_run else ""), file=out)
    verbs = {"write": "would write" if args.dry_run else "wrote", "replace": "would replace" if args.dry_run else
             "replaced", "unchanged": "unchanged", "keep": "kept"}
    for it, where, action, note in plan:
        if not args.dry_run and action in ("write", "replace"):
            try:
                _write(where, it.text)
            except OSError as e:
                raise InstallError(f"cannot write {where}: {e.strerror or e}") from None
        detail = note or (f"ExecStart={' '.join(command)} run" if it.path == UNIT else "")
        print(f"  {verbs[action]:<13} {where}{f'  ({detail})' if detail else ''}", file=out)

    problems = readability_problems(command)
    missing = [n for n in RUNTIME_PACKAGES if importlib.util.find_spec(n) is None]
    if missing:
        print(f"\nWARNING: {', '.join(missing)} cannot be imported by this installation: `ftpalg run` will fail. "
              f"Install ftpalg with its dependencies: {Path(sys.executable).parent / 'pip'} install ftpalg-*.whl",
              file=out)
    if problems:
        print("\nWARNING: the unit runs ftpalg as a dynamic user (DynamicUser=yes: neither owner nor group of "
              "these files), which cannot use this installation:", file=out)
        for p in problems:
            print(f"  - {p}", file=out)
        print("The service would fail to start. Install ftpalg where others can read it, with a venv made from "
              "the system python, and run its `ftpalg install`:\n"
              "  python3 -m venv /opt/ftpalg && /opt/ftpalg/bin/pip install ftpalg-*.whl && "
              "/opt/ftpalg/bin/ftpalg install", file=out)

    print("\nnext:" if root == Path("/") else f"\nfiles staged under {root}; on the gateway, next:", file=out)
    print(f"  edit {CONFIG} if needed, and check it: {command[0]} check-config", file=out)
    for c in NEXT:
        print(f"  {c}", file=out)
    print(f"  {command[0]} status", file=out)
    print("  man ftpalg; man ftpalg.toml", file=out)
    print(f"(install_rules = false / --no-rules: load the rule files in {RULES_DIR}/ yourself, see "
          "docs/deploying.md)", file=out)
    if root == Path("/") and not Path("/run/systemd/system").is_dir():
        print("\nnote: systemd is not running on this machine (no /run/systemd/system): the unit is in place but "
              "cannot be started here", file=out)
    return 0


def add_parser(sub: Any) -> None:
    """``ftpalg install`` on the CLI's subparsers."""
    p = sub.add_parser("install", help="install the systemd unit, the default configuration, the rule files and the "
                       "manual pages",
                       description=f"Write {UNIT} (ExecStart= this installation's ftpalg), {CONFIG} (only if "
                                   f"absent: never overwritten), the rule files to {RULES_DIR}/ (for "
                                   f"--no-rules) and the manual pages ftpalg(8) and ftpalg.toml(5) to {MAN_DIR}/. "
                                   "A unit, rule file or manual page that differs is kept unless --force. Then: "
                                   f"{NEXT[0]}")
    p.add_argument("--root", metavar="DIR", help="write under DIR instead of / (staging, tests)")
    p.add_argument("--dry-run", action="store_true", help="say what would be written, write nothing")
    p.add_argument("--force", action="store_true",
                   help="replace a unit, rule file or manual page that differs (never the configuration)")
    p.set_defaults(func=cmd_install)
