"""The live ruleset of a network namespace, read (never written) for ``ftpalg doctor``: the
output of ``iptables-save``/``ip6tables-save`` of each backend that has tables here and of
``nft -a list ruleset``, parsed into rules with their table, chain, ports and targets.

iptables-nft's tables are read from ``iptables-save`` (it shows what nft lists only as
``xt target CT``, e.g. the helper name); every other nft table from ``nft``'s listing.
The parsers are pure functions of text (tests feed them recorded listings).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

XT_TABLES = ("filter", "nat", "mangle", "raw", "security")
PortSpec = tuple[tuple[int, int], ...]  # ranges lo..hi; () = no port test (any port)


@dataclass(frozen=True)
class Rule:
    """One rule: ``tool`` is how to change it ("iptables", "ip6tables", "iptables-legacy",
    "ip6tables-legacy" or "nft"), ``table`` its table ("nat"; nft: "inet firewalld"),
    ``text`` its rule as listed (iptables: after ``-A CHAIN``), ``handle`` nft's handle."""

    tool: str
    table: str
    chain: str
    text: str
    handle: int | None = None

    @property
    def nft(self) -> bool:
        return self.tool == "nft"

    @property
    def tokens(self) -> list[str]:
        try:
            return shlex.split(self.text)
        except ValueError:
            return self.text.split()

    def shown(self) -> str:
        """The rule as an admin would type it to add it."""
        if self.nft:
            return f"nft add rule {self.table} {self.chain} {self.text}"
        return f"{self.tool} -t {self.table} -A {self.chain} {self.text}"

    def delete(self) -> str:
        """The command that deletes exactly this rule."""
        if self.nft:
            return f"nft delete rule {self.table} {self.chain} handle {self.handle}"
        return f"{self.tool} -t {self.table} -D {self.chain} {self.text}"

    # ---- what the rule matches and does ------------------------------------------------------
    def dports(self) -> PortSpec:
        """The TCP destination ports the rule tests (() if it tests none)."""
        if self.nft:
            m = re.search(r"\b(?:tcp|th) dport (\{[^}]*\}|\S+)", self.text)
            return _ports(m.group(1).strip("{} ").replace(" ", "")) if m else ()
        t = self.tokens
        for opt in ("--dport", "--destination-port", "--dports", "--destination-ports"):
            if opt in t and t.index(opt) + 1 < len(t):
                return _ports(t[t.index(opt) + 1].replace(":", "-"))
        return ()

    def jump(self) -> str | None:
        """The chain this rule jumps (or goes) to, if any."""
        if self.nft:
            m = re.search(r"\b(?:jump|goto) (\S+)", self.text)
            return m.group(1) if m else None
        t = self.tokens
        for opt in ("-j", "--jump", "-g", "--goto"):
            if opt in t and t.index(opt) + 1 < len(t):
                return t[t.index(opt) + 1]
        return None

    def option(self, name: str) -> str | None:
        """The value of iptables option ``name`` (``--helper``), or None."""
        t = self.tokens
        return t[t.index(name) + 1] if name in t and t.index(name) + 1 < len(t) else None

    def dnat_port(self) -> int | None:
        """The port a DNAT or REDIRECT rule sends connections to (the first of a range);
        None if it is no such rule or keeps the port."""
        if self.nft:
            m = re.search(r"\bdnat (?:ip6? )?to (\S+)", self.text)
            if m:
                return _target_port(m.group(1))
            m = re.search(r"\bredirect to :?(\d+)", self.text)
            return int(m.group(1)) if m else None
        target = self.jump()
        if target == "DNAT":
            dest = self.option("--to-destination")
            return _target_port(dest) if dest else None
        if target == "REDIRECT":
            ports = self.option("--to-ports")
            return int(ports.split("-")[0]) if ports and ports.split("-")[0].isdigit() else None
        return None

    def labels(self) -> list[str]:
        """The conntrack labels the rule tests or sets (numbers, or names of connlabel.conf)."""
        if self.nft:
            return re.findall(r"\bct label (?:set )?(?:!= )?(\w+)", self.text)
        t = self.tokens
        return [t[i + 1] for i, w in enumerate(t[:-1]) if w == "--label"]


def _ports(text: str) -> PortSpec:
    out = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        if lo.isdigit() and (not hi or hi.isdigit()):
            out.append((int(lo), int(hi or lo)))
    return tuple(out)


def _target_port(dest: str) -> int | None:
    """The port of a DNAT destination: ``10.0.0.2:21``, ``[2001:db8::2]:21``, ``:21``,
    ``10.0.0.2-10.0.0.3:21-22``; None without one."""
    if dest.startswith("["):
        dest = dest.partition("]")[2]
    elif dest.count(":") > 1:  # an IPv6 address without brackets: no port
        return None
    m = re.search(r":(\d+)(?:-\d+)?$", dest)
    return int(m.group(1)) if m else None


def in_spec(port: int, spec: PortSpec) -> bool:
    return any(lo <= port <= hi for lo, hi in spec)


def spec_ports(spec: PortSpec, limit: int = 16) -> list[int]:
    """The ports of a spec, if it names few enough to list."""
    ports = [p for lo, hi in spec for p in range(lo, hi + 1)]
    return ports if len(ports) <= limit else []


@dataclass
class Ruleset:
    """Everything the namespace's tools listed: rules, chain policies (``(tool, table,
    chain)`` -> (hook, policy)), nft ct helper objects (``(table, name)`` -> helper type)
    and what could not be read (``errors``: tool -> message)."""

    rules: list[Rule] = field(default_factory=list)
    chains: dict[tuple[str, str, str], tuple[str, str]] = field(default_factory=dict)
    helpers: dict[tuple[str, str], str] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    def chain_names(self) -> set[str]:
        return {c for _, _, c in self.chains} | {r.chain for r in self.rules}

    def tables(self) -> set[str]:
        return {t for _, t, _ in self.chains} | {r.table for r in self.rules}

    def public_ports(self, rule: Rule, depth: int = 5) -> list[PortSpec]:
        """The destination ports that lead to ``rule``: its own, else those of every rule
        that jumps to its chain (followed up to ``depth`` chains: kube-proxy's
        KUBE-SERVICES -> KUBE-SVC-* -> KUBE-SEP-*)."""
        own = rule.dports()
        if own or depth == 0:
            return [own] if own else []
        out: list[PortSpec] = []
        for r in self.rules:
            if r.tool == rule.tool and r.table == rule.table and r.jump() == rule.chain and r is not rule:
                out += self.public_ports(r, depth - 1)
        return out


def parse_iptables_save(text: str, tool: str, skip_chain_prefix: str = "") -> Ruleset:
    """``iptables-save`` output (``tool``: the command that changes these rules)."""
    rs = Ruleset()
    table = ""
    for line in text.splitlines():
        if line.startswith("*"):
            table = line[1:].strip()
        elif line.startswith(":") and table:
            parts = line[1:].split()
            if parts and not (skip_chain_prefix and parts[0].startswith(skip_chain_prefix)):
                rs.chains[(tool, table, parts[0])] = ("", parts[1].lower() if len(parts) > 1 else "-")
        elif line.startswith("-A ") and table:
            chain, _, rest = line[3:].partition(" ")
            if not (skip_chain_prefix and chain.startswith(skip_chain_prefix)):
                rs.rules.append(Rule(tool, table, chain, rest.strip()))
    return rs


def xt_tables(text: str) -> set[str]:
    """The tables an iptables-nft ``-save`` printed in full (not "incompatible")."""
    bad = set(re.findall(r"Table `(\w+)' is incompatible", text))
    return {line[1:].strip() for line in text.splitlines() if line.startswith("*")} - bad


def parse_nft(text: str, skip: Iterable[str] = ()) -> Ruleset:
    """``nft -a list ruleset`` output; tables in ``skip`` ("ip nat": iptables-nft's, read
    from iptables-save instead; "inet ftpalg": ours) are left out."""
    rs = Ruleset()
    skipped = set(skip)
    table = chain = helper = ""
    block = ""  # "chain", "set", "helper", other objects: what the open brace belongs to
    for raw in text.splitlines():
        line, _, comment = raw.partition(" # handle ")
        line = line.strip()
        handle = int(comment) if comment.strip().isdigit() else None
        if line.startswith("table ") and line.endswith("{"):
            table = " ".join(line.split()[1:3])
            block = ""
            continue
        if not table or table in skipped:
            if line == "}" and not block:
                table = ""
            elif line.endswith("{"):
                block = "other"
            elif line == "}":
                block = ""
            continue
        if line == "}":
            if block:
                block = chain = helper = ""
            else:
                table = ""
            continue
        if line.startswith("chain ") and line.endswith("{"):
            block, chain = "chain", line.split()[1]
            rs.chains[("nft", table, chain)] = ("", "")
        elif line.startswith("ct helper ") and line.endswith("{"):
            block, helper = "helper", line.split()[2].strip('"')
        elif line.endswith("{"):
            block = "other"
        elif block == "helper" and line.startswith("type "):
            rs.helpers[(table, helper)] = line.split()[1].strip('"')
        elif block == "chain" and line.startswith("type ") and "hook" in line:
            hook = line.split("hook", 1)[1].split()[0]
            m = re.search(r"policy (\w+)", line)
            rs.chains[("nft", table, chain)] = (hook, m.group(1) if m else "accept")
        elif block == "chain" and line and not line.startswith(("policy ", "comment ")):
            rs.rules.append(Rule("nft", table, chain, line, handle))
    return rs


def merge(parts: Iterable[Ruleset]) -> Ruleset:
    out = Ruleset()
    for p in parts:
        out.rules += p.rules
        out.chains.update(p.chains)
        out.helpers.update(p.helpers)
        out.errors.update(p.errors)
    return out


def label_names(texts: Iterable[str]) -> dict[str, int]:
    """connlabel.conf contents -> {name: bit}: lines ``<bit> <name>``."""
    out = {}
    for text in texts:
        for line in text.splitlines():
            parts = line.split("#", 1)[0].split()
            if len(parts) >= 2 and parts[0].isdigit():
                out[parts[1]] = int(parts[0])
    return out


def iter_dnat(rs: Ruleset) -> Iterator[tuple[Rule, int]]:
    """(rule, port it sends to) of every DNAT/REDIRECT rule that names a port."""
    for r in rs.rules:
        port = r.dnat_port()
        if port is not None:
            yield r, port
