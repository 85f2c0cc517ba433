"""The configuration of ``ftpalg run``: a TOML file, validated, with command-line overrides.

Sources, lowest to highest precedence: the built-in defaults (the dataclass defaults below,
equal to ``deploy/ftpalg.toml``), the file (``--config FILE``, else ``/etc/ftpalg/ftpalg.toml``
if it exists), then the options given on the command line. A key the file leaves out keeps
its default; an option not given leaves the file's value alone.

Every value, from the file or from an option, goes through the same check (``check``): a
bad one raises ``ConfigError``, whose message names where it came from (the file, or the
option), the key (``policy.min_port``) and the problem::

    /etc/ftpalg/ftpalg.toml: policy.min_port: must be in 1..65535, not 0
    --pinhole-timeout: gateway.pinhole_timeout: must be more than 0 (seconds), not -5.0
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import json
import math
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .core.nat64 import PREFIX_LENGTHS
from .core.nat64 import Nat64 as Translator
from .core.policy import DEFAULT_LIMITS, Limits

DEFAULT_PATH = Path("/etc/ftpalg/ftpalg.toml")
DEFAULT_QUEUE = 2121  # the NFQUEUE number (workers: this and the next ones)
LOG_LEVELS = ("debug", "info", "warning", "error")
QUEUE_BACKENDS = ("auto", "nft", "iptables")
QUEUE_MODES = ("selected", "all")
MAX_PINHOLE_TIMEOUT = 86400.0
MAX_WORKERS = 64
SUN_PATH_MAX = 107  # bytes of a unix socket address, without the final (or, abstract: leading) NUL


class ConfigError(Exception):
    """A configuration that cannot be used: ``origin: key: problem``."""

    def __init__(self, origin: str, key: str | None, problem: str) -> None:
        self.origin, self.key, self.problem = origin, key, problem
        super().__init__(f"{origin}: {key}: {problem}" if key else f"{origin}: {problem}")


class _Problem(ValueError):
    """A value's problem, before it is known where the value came from."""


class OptionText(str):
    """A value as typed on the command line: numbers in it are parsed (in a file, a string
    where a number belongs is an error)."""


# ---- the configuration ----------------------------------------------------------------------
@dataclass(frozen=True)
class Gateway:
    control_ports: tuple[int, ...] = (21,)  # sorted, no duplicates
    queue_num: int = DEFAULT_QUEUE
    queue_backend: str = "auto"
    install_rules: bool = True
    pinhole_timeout: float = 120.0
    workers: int = 1  # processes, each on its own queue (queue_num, queue_num + 1, ...)
    queue: str = "selected"  # which control segments are queued: see rules.py ("all": what the audit log needs)


@dataclass(frozen=True)
class Policy:
    min_port: int = DEFAULT_LIMITS.min_port
    max_flows: int = DEFAULT_LIMITS.max_flows
    max_pinholes: int = DEFAULT_LIMITS.max_pinholes
    max_pinholes_per_client: int = DEFAULT_LIMITS.max_pinholes_per_client
    max_held_bytes: int = DEFAULT_LIMITS.max_held_bytes


@dataclass(frozen=True)
class Log:
    level: str = "info"


@dataclass(frozen=True)
class Audit:
    enabled: bool = False
    file: str = ""  # "": the log (stderr / journald); else an absolute path appended to


@dataclass(frozen=True)
class Metrics:
    listen: str = "127.0.0.1:9121"  # "": no endpoint

    @property
    def address(self) -> tuple[str, int] | None:
        """(host, port) to bind (brackets of an IPv6 host removed), or None: off."""
        return split_host_port(self.listen) if self.listen else None


@dataclass(frozen=True)
class Status:
    socket: str = "@ftpalg-status"  # "@name": abstract; else a path; "": no status socket

    @property
    def address(self) -> str | None:
        """The address to bind an AF_UNIX socket to (abstract: leading NUL), or None: off."""
        if not self.socket:
            return None
        return "\0" + self.socket[1:] if self.socket.startswith("@") else self.socket


@dataclass(frozen=True)
class Nat64:
    pool: tuple[str, ...] = ()  # the translator's IPv4 pools (CIDR): their connections are translated
    prefix: str = ""  # the translator's IPv6 prefix (RFC 6052), for LPSV's 228; "": none

    def translator(self) -> Translator | None:
        return Translator.of(self.pool, self.prefix)


@dataclass(frozen=True)
class Config:
    gateway: Gateway = field(default_factory=Gateway)
    policy: Policy = field(default_factory=Policy)
    log: Log = field(default_factory=Log)
    audit: Audit = field(default_factory=Audit)
    metrics: Metrics = field(default_factory=Metrics)
    status: Status = field(default_factory=Status)
    nat64: Nat64 = field(default_factory=Nat64)
    # Where it came from (not part of equality): the file, or "built-in defaults", and for
    # each key not at its default, the file or the option that set it.
    source: str = field(default="built-in defaults", compare=False)
    origins: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    def get(self, key: str) -> Any:
        section, name = key.split(".")
        return getattr(getattr(self, section), name)

    def limits(self) -> Limits:
        p = self.policy
        return Limits(p.min_port, p.max_flows, p.max_pinholes, p.max_pinholes_per_client, p.max_held_bytes)

    @property
    def control_ports(self) -> frozenset[int]:
        return frozenset(self.gateway.control_ports)

    @property
    def queue_selected(self) -> bool:
        """Whether only the segments that may carry an address are queued: ``gateway.queue``,
        unless the audit log is on (it records every transfer's command and reply, so it
        needs every line)."""
        return self.gateway.queue == "selected" and not self.audit.enabled

    def alg_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``core.alg.Alg`` besides its kernel port."""
        return {"control_ports": self.control_ports, "pinhole_timeout": self.gateway.pinhole_timeout,
                "limits": self.limits(), "selected": self.queue_selected, "nat64": self.nat64.translator()}

    def override(self, values: Mapping[str, tuple[object, str]]) -> Config:
        """A copy with ``values`` (key -> (value, origin)) checked and set."""
        flat = {k: self.get(k) for k in KEYS}
        origins = dict(self.origins)
        for key, (value, origin) in values.items():
            flat[key] = check(key, value, origin)
            origins[key] = origin
        return _build(flat, self.source, origins)

    def to_toml(self, sources: bool = True) -> str:
        """Every key, as TOML (``from_toml`` reads it back to an equal Config); with
        ``sources``, a comment after each value not at its default saying what set it."""
        defaults = Config()
        out = [f"# ftpalg configuration: {self.source}"]
        section = ""
        for key in KEYS:
            sec, name = key.split(".")
            if sec != section:
                out += ["", f"[{sec}]"]
                section = sec
            line = f"{name} = {toml_value(self.get(key))}"
            if sources and self.get(key) != defaults.get(key):
                line += f"  # from {self.origins.get(key, self.source)}"
            out.append(line)
        return "\n".join(out) + "\n"


# ---- checks: each takes a value as TOML gives it, or an option's text ---------------------------
def _describe(v: object) -> str:
    if isinstance(v, bool):
        return f"a boolean ({'true' if v else 'false'})"
    if isinstance(v, int):
        return f"an integer ({v})"
    if isinstance(v, float):
        return f"a float ({v})"
    if isinstance(v, str):
        return f"a string ({json.dumps(v)})"
    if isinstance(v, list):
        return "an array"
    if isinstance(v, dict):
        return "a table"
    return f"a {type(v).__name__}"


def _int(v: object, lo: int, hi: int | None = None) -> int:
    if isinstance(v, OptionText):
        try:
            v = int(v.strip(), 10)
        except ValueError:
            raise _Problem(f"must be an integer, not {json.dumps(v)}") from None
    if isinstance(v, bool) or not isinstance(v, int):
        raise _Problem(f"must be an integer, not {_describe(v)}")
    if v < lo or (hi is not None and v > hi):
        raise _Problem(f"must be in {lo}..{hi}, not {v}" if hi is not None else f"must be at least {lo}, not {v}")
    return v


def _ranged(lo: int, hi: int | None = None) -> Callable[[object], int]:
    return lambda v: _int(v, lo, hi)


def _port_list(v: object) -> tuple[int, ...]:
    if isinstance(v, OptionText):  # "21" or "21,2121"
        v = [OptionText(p) for p in v.split(",") if p.strip()]
    elif isinstance(v, int) and not isinstance(v, bool):
        raise _Problem(f"must be an array of ports ([{v}]), not {_describe(v)}")
    if not isinstance(v, list | tuple):
        raise _Problem(f"must be an array of ports, not {_describe(v)}")
    if not v:
        raise _Problem("must name at least one port")
    ports = set()
    for i, p in enumerate(v):
        try:
            ports.add(_int(p, 1, 65535))
        except _Problem as e:
            raise _Problem(f"element {i + 1}: {e}" if len(v) > 1 else str(e)) from None
    return tuple(sorted(ports))


def _pinhole_timeout(v: object) -> float:
    if isinstance(v, OptionText):
        try:
            v = float(v.strip())
        except ValueError:
            raise _Problem(f"must be a number of seconds, not {json.dumps(v)}") from None
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise _Problem(f"must be a number of seconds, not {_describe(v)}")
    v = float(v)
    if not math.isfinite(v) or v <= 0:
        raise _Problem(f"must be more than 0 (seconds), not {v}")
    if v > MAX_PINHOLE_TIMEOUT:
        raise _Problem(f"must be at most {MAX_PINHOLE_TIMEOUT:g} (seconds, one day), not {v}")
    return v


def _bool(v: object) -> bool:
    if not isinstance(v, bool):
        raise _Problem(f"must be true or false, not {_describe(v)}")
    return v


def _str(v: object) -> str:
    if not isinstance(v, str):
        raise _Problem(f"must be a string, not {_describe(v)}")
    if "\0" in v:
        raise _Problem("must not contain a NUL character")
    return str(v)


def _enum(choices: tuple[str, ...]) -> Callable[[object], str]:
    def check(v: object) -> str:
        s = _str(v).strip().lower()
        if s not in choices:
            hint = _closest(s, choices)
            raise _Problem(f"must be one of {', '.join(choices)}, not {json.dumps(v)}"
                           + (f" (did you mean {hint!r}?)" if hint else ""))
        return s
    return check


_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*\.?")


def split_host_port(text: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port); raises _Problem."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise _Problem(f"must be [IPv6]:port, not {json.dumps(text)}")
        try:
            ipaddress.IPv6Address(host.split("%")[0])
        except ValueError:
            raise _Problem(f"{json.dumps(host)} is not an IPv6 address") from None
    else:
        host, sep, port = text.rpartition(":")
        if not sep or not host:
            raise _Problem(f"must be host:port (e.g. 127.0.0.1:9121 or [::1]:9121), not {json.dumps(text)}")
        if ":" in host:
            raise _Problem(f"an IPv6 address needs brackets: [{host}]:{port}, not {json.dumps(text)}")
        if re.fullmatch(r"[0-9.]+", host):
            try:
                ipaddress.IPv4Address(host)
            except ValueError:
                raise _Problem(f"{json.dumps(host)} is not an IPv4 address") from None
        elif not _HOSTNAME.fullmatch(host):
            raise _Problem(f"{json.dumps(host)} is neither an IPv4 address nor a host name")
    if not port.isdigit():
        raise _Problem(f"port must be a number, not {json.dumps(port)}")
    try:
        return host, _int(int(port), 1, 65535)
    except _Problem as e:
        raise _Problem(f"port {e}") from None


def _listen(v: object) -> str:
    s = _str(v).strip()
    if s:
        split_host_port(s)
    return s


def _socket(v: object) -> str:
    s = _str(v)
    if not s:
        return s
    if s == "@":
        raise _Problem('an abstract socket needs a name after "@" ("@ftpalg-status")')
    if not s.startswith("@") and not s.startswith("/"):
        raise _Problem(f'must be "@name" (abstract) or an absolute path, not {json.dumps(s)}')
    if len(os.fsencode(s)) > SUN_PATH_MAX:
        raise _Problem(f"is longer than {SUN_PATH_MAX} bytes (a unix socket address), not {json.dumps(s)}")
    return s


def _path_or_empty(v: object) -> str:
    s = _str(v)
    if s and not s.startswith("/"):
        raise _Problem(f'must be "" (the log) or an absolute path, not {json.dumps(s)}')
    return s


def _pools(v: object) -> tuple[str, ...]:
    if isinstance(v, OptionText):  # "192.168.255.0/24" or "a/24,b/24"; "" = none
        v = [p.strip() for p in v.split(",") if p.strip()]
    elif isinstance(v, str):
        v = [v] if v.strip() else []
    if not isinstance(v, list | tuple):
        raise _Problem(f"must be an IPv4 network (\"192.168.255.0/24\") or an array of them, not {_describe(v)}")
    out = []
    for i, p in enumerate(v):
        where = f"element {i + 1}: " if len(v) > 1 else ""
        if not isinstance(p, str):
            raise _Problem(f"{where}must be an IPv4 network as a string, not {_describe(p)}")
        try:
            net = ipaddress.IPv4Network(p.strip(), strict=False)
        except ValueError:
            raise _Problem(f"{where}{json.dumps(p)} is not an IPv4 network (a.b.c.d/n)") from None
        if str(net) not in out:
            out.append(str(net))
    return tuple(out)


def _prefix(v: object) -> str:
    s = _str(v).strip()
    if not s:
        return s
    try:
        net = ipaddress.IPv6Network(s, strict=False)
    except ValueError:
        raise _Problem(f"{json.dumps(s)} is not an IPv6 prefix (e.g. \"2001:db8:64::/96\")") from None
    if net.prefixlen not in PREFIX_LENGTHS:
        raise _Problem(f"/{net.prefixlen} is not a length RFC 6052 embeds IPv4 addresses after "
                       f"({', '.join(f'/{n}' for n in PREFIX_LENGTHS)})")
    return str(net)


@dataclass(frozen=True)
class Key:
    check: Callable[[object], Any]
    doc: str  # what the key does, its range: deploy/ftpalg.toml and ftpalg.toml(5) are made from it (docgen.py)


KEYS: dict[str, Key] = {
    "gateway.control_ports": Key(_port_list, "FTP control ports whose connections are watched (1..65535; "
                                 "duplicates merged). A public port forwarded to another inside port needs both, "
                                 "e.g. [21, 2121]."),
    "gateway.queue_num": Key(_ranged(0, 65535), "NFQUEUE number the control segments are queued to (0..65535)."),
    "gateway.queue_backend": Key(_enum(QUEUE_BACKENDS), 'How control segments are queued: "auto" or "iptables" '
                                 "(iptables' NFQUEUE target, the tested path), or \"nft\" (nft's queue statement: "
                                 "opt-in, untested with traffic)."),
    "gateway.queue": Key(_enum(QUEUE_MODES), 'Which control segments leave the kernel: "selected" (only those that '
                         "may carry or continue a data address: PORT/EPRT/LPRT/PASV/EPSV/LPSV/AUTH/ALGS from the "
                         "client, 227/228/229/234 from the server, a line split across segments, whole streams "
                         'while ftpalg asks for them, and FINs; needs the iptables backend) or "all" (every segment '
                         "with payload, SYN, FIN and RST; what the audit log needs: with audit.enabled it is "
                         "\"all\" whatever this says)."),
    "gateway.workers": Key(_ranged(1, MAX_WORKERS), "Worker processes, each on its own queue (queue_num, "
                           f"queue_num + 1, ...; 1..{MAX_WORKERS}). One per core the gateway can spare for ftpalg; "
                           "both directions of a control connection always reach the same worker (docs/deploying.md, "
                           '"Several workers").'),
    "gateway.install_rules": Key(_bool, "false: do not install/remove table inet ftpalg and the queue rule; load the "
                                 "rule files yourself (ftpalg install puts them in /etc/ftpalg/rules/)."),
    "gateway.pinhole_timeout": Key(_pinhole_timeout, "Seconds after which an unused pinhole (expectation) is forgotten "
                                   f"(> 0, <= {MAX_PINHOLE_TIMEOUT:g})."),
    "policy.min_port": Key(_ranged(1, 65535), "Never open a pinhole to a port below this (1..65535; 1 allows any)."),
    "policy.max_flows": Key(_ranged(1), "Control connections tracked at once; at the cap the least recently seen "
                            "idle ones are forgotten (>= 1)."),
    "policy.max_pinholes": Key(_ranged(1), "Live pinholes in total; beyond, announcements open nothing (>= 1)."),
    "policy.max_pinholes_per_client": Key(_ranged(1), "Live pinholes of one FTP client address (>= 1)."),
    "policy.max_held_bytes": Key(_ranged(1), "Bytes of segments held back for split lines or reordering, in total "
                                 "(>= 1)."),
    "log.level": Key(_enum(LOG_LEVELS), '"debug", "info", "warning" or "error".'),
    "audit.enabled": Key(_bool, "One structured line per transfer."),
    "audit.file": Key(_path_or_empty, '"": the lines go to the log (stderr / journald); else an absolute path they '
                      "are appended to (--audit-file also turns audit on)."),
    "metrics.listen": Key(_listen, 'host:port ([v6]:port for IPv6) of the Prometheus endpoint; "" = off.'),
    "status.socket": Key(_socket, "Unix socket that `ftpalg status` talks to: \"@name\" = an abstract socket (one per "
                         'network namespace, no file), else an absolute path; "" = off.'),
    "nat64.pool": Key(_pools, "IPv4 pools of a NAT64 translator on this gateway (CIDR, one or an array, "
                      "e.g. Tayga's dynamic-pool): a control connection from an address in a pool is a translated one "
                      "(RFC 6384: EPSV/EPRT/ALGS translated, docs/nat64.md); []: off."),
    "nat64.prefix": Key(_prefix, "The translator's IPv6 prefix (RFC 6052: /32, /40, /48, /56, /64 or /96), needed "
                        'for LPSV\'s 228 and to refuse an EPRT naming an address under it; "": none.'),
}
SECTIONS: dict[str, type] = {"gateway": Gateway, "policy": Policy, "log": Log, "audit": Audit,
                             "metrics": Metrics, "status": Status, "nat64": Nat64}


def check(key: str, value: object, origin: str) -> Any:
    """``value`` of ``key`` (as TOML gives it, or an option's text), checked and normalised;
    ConfigError if it is unusable."""
    try:
        return KEYS[key].check(value)
    except _Problem as e:
        raise ConfigError(origin, key, str(e)) from None


def _closest(word: str, candidates: Iterable[str]) -> str | None:
    """The candidate ``word`` abbreviates or extends, else the most similar one, if any."""
    options = list(candidates)
    for c in options:
        if word and (c.startswith(word) or word.startswith(c)):
            return c
    hint = difflib.get_close_matches(word, options, 1, 0.6)
    return hint[0] if hint else None


def _did_you_mean(word: str, candidates: Iterable[str], prefix: str = "") -> str:
    hint = _closest(word, candidates)
    return f" (did you mean {prefix}{hint}?)" if hint else ""


def _unknown(name: str, section: str | None, origin: str, is_table: bool = False) -> ConfigError:
    full = f"{section}.{name}" if section else name
    elsewhere = [k for k in KEYS if k.split(".")[1] == name and k.split(".")[0] != section]
    if elsewhere:
        hint = f" (did you mean {elsewhere[0]}?)"
    elif section:
        hint = _did_you_mean(name, (k.split(".")[1] for k in KEYS if k.startswith(section + ".")), section + ".")
    else:
        hint = _did_you_mean(name, SECTIONS)
    what = "section" if is_table else "key" if section or elsewhere else "key (keys belong in a section)"
    return ConfigError(origin, full, f"unknown {what}{hint}")


def _build(flat: Mapping[str, Any], source: str, origins: Mapping[str, str]) -> Config:
    last = flat["gateway.queue_num"] + flat["gateway.workers"] - 1
    if last > 65535:  # each worker has its own queue, numbered on from queue_num
        key = "gateway.workers" if "gateway.workers" in origins else "gateway.queue_num"
        raise ConfigError(origins.get(key, source), key,
                          f"queue_num {flat['gateway.queue_num']} with {flat['gateway.workers']} workers needs "
                          f"queues up to {last}: more than 65535")
    sections = {}
    for sec, cls in SECTIONS.items():
        sections[sec] = cls(**{k.split(".")[1]: v for k, v in flat.items() if k.startswith(sec + ".")})
    return Config(**sections, source=source, origins=dict(origins))


def from_dict(data: Mapping[str, Any], origin: str) -> Config:
    """A Config from parsed TOML; every key is checked, unknown ones refused."""
    defaults = Config()
    flat = {k: defaults.get(k) for k in KEYS}
    origins = {}
    for sec, table in data.items():
        if sec not in SECTIONS:
            raise _unknown(sec, None, origin, isinstance(table, dict))
        if not isinstance(table, dict):
            raise ConfigError(origin, sec, f"must be a table ([{sec}]), not {_describe(table)}")
        for name, value in table.items():
            key = f"{sec}.{name}"
            if key not in KEYS:
                raise _unknown(name, sec, origin)
            flat[key] = check(key, value, origin)
            if flat[key] != defaults.get(key):
                origins[key] = origin
    return _build(flat, origin, origins)


def from_toml(text: str, origin: str = "<config>") -> Config:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(origin, None, f"not valid TOML: {e}") from None
    return from_dict(data, origin)


def load(path: str | os.PathLike[str]) -> Config:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(str(path), None, f"cannot read: {getattr(e, 'strerror', None) or e}") from None
    return from_toml(text, str(path))


def load_default(path: str | os.PathLike[str] | None = None) -> Config:
    """``path`` if given (it must exist), else DEFAULT_PATH if it exists, else the defaults."""
    if path is not None:
        return load(path)
    if DEFAULT_PATH.exists():
        return load(DEFAULT_PATH)
    return dataclasses.replace(Config(), source=f"built-in defaults (no {DEFAULT_PATH})")


_ESCAPES = {"\"": '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):  # a TOML basic string
        return '"' + "".join(c if c >= " " and c not in '"\\\x7f' else _ESCAPES.get(c, f"\\u{ord(c):04x}")
                             for c in v) + '"'
    if isinstance(v, tuple | list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(f"no TOML form for {v!r}")
