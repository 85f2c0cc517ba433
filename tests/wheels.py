"""ftpalg's wheel for the tests that install it (test_packaging.py, test_systemd.py): built
once per run from a copy of this checkout, and the same wheel as another version (an upgrade)."""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# pip's words for an index it could not reach (a machine offline, a proxy down)
OFFLINE = re.compile(r"NewConnectionError|ConnectTimeoutError|ReadTimeoutError|ProxyError|"
                     r"Temporary failure in name resolution|Network is unreachable")


def build_wheel(src: Path, out: Path) -> Path:
    """The wheel of this checkout, built from a copy of it in ``src`` into ``out`` (``pip
    wheel --no-deps --no-build-isolation`` with this venv's setuptools: no network, nothing
    written into the checkout)."""
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for name in ("ftpalg", "deploy"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    # this venv's setuptools builds it (no network); else pip fetches one
    isolation = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-w", str(out), str(src)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    (whl,) = out.glob("ftpalg-*.whl")
    return whl


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def as_version(whl: Path, version: str, out: Path) -> Path:
    """``whl`` rebuilt as ``version`` in ``out``: the version in its name, its metadata, its
    ``.dist-info``/``.data`` directories and ``ftpalg.__version__``, RECORD's hashes again
    (what a new release of the same code looks like to pip and to ``ftpalg --version``)."""
    old = whl.name.split("-")[1]
    new_whl = out / whl.name.replace(f"-{old}-", f"-{version}-")
    with zipfile.ZipFile(whl) as src, zipfile.ZipFile(new_whl, "w", zipfile.ZIP_DEFLATED) as dst:
        record = ""
        lines = []
        for info in src.infolist():
            name = re.sub(rf"^ftpalg-{re.escape(old)}\.(dist-info|data)/", rf"ftpalg-{version}.\1/", info.filename)
            data = src.read(info)
            if name == "ftpalg/__init__.py":
                data, n = re.subn(rb'(?m)^__version__ = ".*"$', f'__version__ = "{version}"'.encode(), data)
                assert n == 1
            elif name.endswith(".dist-info/METADATA"):
                data, n = re.subn(rb"(?m)^Version: .*$", f"Version: {version}".encode(), data)
                assert n == 1
            if name.endswith(".dist-info/RECORD"):
                record = name
                continue
            dst.writestr(name, data)
            lines.append(_record_line(name, data))
        dst.writestr(record, "\n".join([*lines, f"{record},,"]) + "\n")
    return new_whl
