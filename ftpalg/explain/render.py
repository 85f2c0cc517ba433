"""Rendering a report: the text for a terminal, the JSON for a machine and the SVG timeline.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from ..core import ftp
from ..core.addr import hostport
from .connections import Announcement, line_text
from .diagnose import Report, pinhole_text
from .nat import PLACEHOLDER, is_private, show


def _rel(t: float, t0: float) -> str:
    return f"{t - t0:7.3f}s"


def text_report(r: Report) -> str:
    out: list[str] = []
    t0 = min([s.t0 for s in r.sessions] + [c.t0 for c in r.data])
    out.append(f"{r.path}: {r.frames} packets, {len(r.sessions)} FTP control connection"
               f"{'s' if len(r.sessions) != 1 else ''}, {len(r.data)} other TCP connection"
               f"{'s' if len(r.data) != 1 else ''}")
    for i, s in enumerate(r.sessions, 1):
        m = s.mapping
        assert m is not None
        out.append("")
        out.append(f"session {i}: {hostport(s.client, s.cport)} -> {hostport(s.server, s.sport)}"
                   f"  user {s.user or '-'}  [{s.verdict.upper()}]")
        out.append(f"  where: {s.where}")
        out.append(f"  at the gateway: client {m.client} connects to {show(m.public, s)}"
                   + (f" (sent on to the server {m.server})" if m.server != m.public else "")
                   + f"; the server sees it as {show(m.client_seen, s)}")
        for a in s.announcements:
            out.append(f"  {_rel(a.line.t, t0)} packet {a.line.frame}: {line_text(a.line.text)}")
            out.append(f"      ftpalg: {show(a.detail, s)}")
            if a.rewritten is not None:
                out.append(f"      rewritten: {show(line_text(a.rewritten), s)}")
            if a.reply is not None:
                out.append(f"      server: {a.reply[1]}")
            for c in a.data:
                out.append(f"      data: {c.describe()}")
            if a.transfer is not None:
                out.append(f"      {a.transfer[0]}: {a.transfer[2] or 'no final reply'}")
            out.append("      => ok" if a.ok else f"      => FAILED ({', '.join(a.problems) or 'see below'})")
        for note in s.notes:
            out.append(f"  note: {note}")
        if s.encrypted_at is not None:
            out.append(f"  packet {s.encrypted_at}: AUTH TLS accepted (234), the rest is encrypted")
        core = " ".join(f"{k}={v}" for k, v in sorted(s.counters.items()) if k != "packets")
        out.append(f"  core counters: {core or 'none'}")
        out.append("  diagnosis:")
        out.extend(f"    - {d}" for d in s.diagnosis)
    unmatched = [c for c in r.data if not c.matched]
    if unmatched:
        out.append("")
        out.append("TCP connections not matched to an announcement:")
        out.extend(f"  {_rel(c.t0, t0)} packet {c.first_frame}: {c.describe()}" for c in unmatched)
    return "\n".join(out) + "\n"


def json_report(r: Report) -> dict[str, Any]:
    sessions = []
    for s in r.sessions:
        m = s.mapping
        assert m is not None
        sessions.append({
            "client": hostport(s.client, s.cport), "server": hostport(s.server, s.sport), "user": s.user,
            "verdict": s.verdict, "where": s.where,
            "mapping": {"client": m.client, "public": None if m.public in PLACEHOLDER.values() else m.public,
                        "server": m.server,
                        "client_seen": None if m.client_seen in PLACEHOLDER.values() else m.client_seen},
            "encrypted_after_packet": s.encrypted_at,
            "announcements": [{
                "packet": a.line.frame, "time": a.line.t, "line": line_text(a.line.text), "form": a.hp.form.name,
                "addr": a.hp.addr, "port": a.hp.port, "private": a.hp.addr is not None and is_private(a.hp.addr),
                "ftpalg": {"action": a.action, "detail": show(a.detail, s),
                           "rewritten": None if a.rewritten is None else show(line_text(a.rewritten), s),
                           "pinhole": None if a.pinhole is None else show(pinhole_text(a.pinhole), s)},
                "server_reply": None if a.reply is None else {"code": a.reply[0], "text": a.reply[1]},
                "transfer": None if a.transfer is None else {"command": a.transfer[0], "code": a.transfer[1],
                                                             "text": a.transfer[2]},
                "data_connections": [c.as_dict() for c in a.data],
                "ok": a.ok, "problems": a.problems, "diagnosis": a.diagnosis,
            } for a in s.announcements],
            "transfers": [{"command": line_text(c.text), "packet": c.frame, "code": code, "text": text}
                          for c, code, text in s.transfers],
            "core_counters": dict(sorted(s.counters.items())),
            "notes": s.notes, "diagnosis": s.diagnosis,
        })
    return {"capture": r.path, "packets": r.frames, "failed": r.failed, "sessions": sessions,
            "unmatched_connections": [c.as_dict() for c in r.data if not c.matched]}


# ---- the timeline picture ------------------------------------------------------------------------

_GREEN, _RED, _GREY, _BLUE, _ORANGE = "#2e8b57", "#c0392b", "#888888", "#1f5fa8", "#d35400"


def svg_timeline(r: Report) -> str:
    """One row per control connection (commands above, replies below, announcements in
    colour) and one per data connection (green worked, red failed, grey unmatched), with
    dashed links from each announcement to the data connections it led to. The time axis is
    ordinal (one step per event, real times as labels): FTP events come in bursts of
    milliseconds between seconds of waiting."""
    events: list[float] = []
    for s in r.sessions:
        events += [ln.t for ln in s.lines] + [s.t0, s.t1]
    for c in r.data:
        events += [c.t0, c.t1]
    times = sorted(set(events))
    step, left, top = 30.0, 190.0, 80.0
    x_of = {t: left + i * step for i, t in enumerate(times)}
    t0 = times[0] if times else 0.0
    width = left + max(1, len(times)) * step + 260
    rows: list[str] = []
    y = top
    lane_y: dict[int, float] = {}

    def label(x: float, yy: float, text: str, color: str = "#000", anchor: str = "start", size: int = 11,
              rotate: float | None = None, cls: str = "") -> str:
        rot = f' transform="rotate({rotate} {x:.1f} {yy:.1f})"' if rotate is not None else ""
        c = f' class="{cls}"' if cls else ""
        return (f'<text x="{x:.1f}" y="{yy:.1f}" fill="{color}" font-size="{size}" text-anchor="{anchor}"'
                f'{rot}{c}>{html.escape(text)}</text>')

    links: list[str] = []
    for i, s in enumerate(r.sessions, 1):
        y += 130 if i == 1 else 260  # room for the slanted labels above and below the lane
        color = {"ok": _GREEN, "failed": _RED, "encrypted": _GREY}[s.verdict]
        x0, x1 = x_of[s.t0], max(x_of[s.t1], x_of[s.t0] + 4)
        rows.append(f'<g class="lane control" id="control-{i}">')
        rows.append(label(10, y + 4, f"control {i}", size=12))
        rows.append(label(10, y + 18, f"{hostport(s.client, s.cport)}", _GREY, size=10))
        rows.append(label(10, y + 30, f"-> {hostport(s.server, s.sport)}", _GREY, size=10))
        rows.append(f'<line x1="{x0:.1f}" y1="{y:.1f}" x2="{x1:.1f}" y2="{y:.1f}" stroke="{color}" '
                    f'stroke-width="6"/>')
        anns = {id(a.line): a for a in s.announcements}
        for ln in s.lines:
            x = x_of[ln.t]
            a = anns.get(id(ln))
            txt = line_text(ln.text)
            if ftp.command_verb(ln.text) == b"PASS":
                txt = "PASS ****"
            txt = txt[:30] + ("…" if len(txt) > 30 else "")
            mark = _ORANGE if a is not None else ("#333" if ln.d == 0 else _BLUE)
            dy = -8 if ln.d == 0 else 8
            rows.append(f'<circle cx="{x:.1f}" cy="{y + dy:.1f}" r="{5 if a else 3}" fill="{mark}" '
                        f'class="{"announcement" if a else ("command" if ln.d == 0 else "reply")}"/>')
            if ln.d == 0:
                rows.append(label(x, y - 14, txt, mark, rotate=-40, size=10))
            else:
                rows.append(label(x, y + 22, txt, mark, rotate=40, size=10))
        if s.encrypted_at is not None:
            rows.append(label(x1 + 6, y + 4, f"TLS after packet {s.encrypted_at}", _GREY))
        rows.append("</g>")
        lane_y[i] = y
    y += 150
    data_rows: list[str] = []
    owner: dict[int, tuple[Announcement, int]] = {}
    for i, s in enumerate(r.sessions, 1):
        for a in s.announcements:
            for c in a.data:
                owner[id(c)] = (a, i)
    for j, c in enumerate(r.data, 1):
        y += 34
        st = c.status
        color = _GREEN if st == "ok" else (_RED if c.matched else _GREY)
        x0, x1 = x_of[c.t0], max(x_of[c.t1], x_of[c.t0] + 6)
        data_rows.append(f'<g class="lane data {st}" id="data-{j}">')
        data_rows.append(label(10, y + 4, f"data {j}", size=12))
        data_rows.append(f'<line x1="{x0:.1f}" y1="{y:.1f}" x2="{x1:.1f}" y2="{y:.1f}" stroke="{color}" '
                         f'stroke-width="6"/>')
        if st != "ok":
            data_rows.append(label(x0 - 4, y + 4, "✗", color, anchor="end", size=14))
        data_rows.append(label(x1 + 8, y + 4, f"{hostport(c.a, c.aport)} → {hostport(c.b, c.bport)}: {st}"
                               f"{f', {c.bytes_ab + c.bytes_ba} B' if c.synack else ''}", color, size=10))
        data_rows.append("</g>")
        if id(c) in owner:
            a, i = owner[id(c)]
            ax = x_of[a.line.t]
            links.append(f'<line class="link" x1="{ax:.1f}" y1="{lane_y[i] + (-8 if a.active else 8):.1f}" '
                         f'x2="{x0:.1f}" y2="{y:.1f}" stroke="{_ORANGE}" stroke-dasharray="4 3"/>')
    # announcements that led to no data connection
    for i, s in enumerate(r.sessions, 1):
        for a in s.announcements:
            if not a.data and not a.ok:
                ax = x_of[a.line.t]
                links.append(label(ax + 6, lane_y[i] + 48, "✗ no data connection", _RED, size=10))
    height = y + 60
    axis = [f'<line x1="{left:.1f}" y1="{top:.1f}" x2="{width - 260:.1f}" y2="{top:.1f}" stroke="#ccc"/>']
    for t in times[:: max(1, len(times) // 30)]:
        axis.append(label(x_of[t], top - 6, f"{t - t0:.3f}", _GREY, size=9, rotate=-40))
    title = f"ftpalg explain {Path(r.path).name}"
    legend = (f'{label(10, 16, title, size=13)}'
              f'{label(360, 16, "● command", "#333", size=10)}{label(440, 16, "● reply", _BLUE, size=10)}'
              f'{label(500, 16, "● PORT/EPRT/227/229", _ORANGE, size=10)}'
              f'{label(640, 16, "— worked", _GREEN, size=10)}{label(700, 16, "— failed", _RED, size=10)}'
              f'{label(760, 16, "— not matched", _GREY, size=10)}'
              f'{label(10, 32, "time axis: one step per event, seconds from the first", _GREY, size=9)}')
    body = "\n".join([legend, *axis, *rows, *data_rows, *links])
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n'
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
            f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="sans-serif">\n'
            f'<rect width="100%" height="100%" fill="white"/>\n{body}\n</svg>\n')
