"""`yuubin status`: the running server at a glance, asked over its control socket."""

from __future__ import annotations

import argparse
import json
import socket
from typing import Any

from yuubin.cli.common import CliError, CliFailure, SubParsers, load_config, plural
from yuubin.logs import utc_time

TIMEOUT = 10.0


def ask(path: str, request: str = "status") -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(TIMEOUT)
        s.connect(path)
        s.sendall(request.encode() + b"\n")
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    doc: dict[str, Any] = json.loads(b"".join(chunks))
    return doc


def _uptime(seconds: float) -> str:
    s = int(seconds)
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            parts.append(f"{s // size}{unit}")
            s %= size
    return " ".join(parts) or f"{s}s"


def render(doc: dict[str, Any]) -> str:
    lines = [f"yuubin {doc['version']}, pid {doc['pid']}, up {_uptime(doc['uptime_seconds'])} "
             f"(since {utc_time(doc['started'])}), {plural(doc['workers'], 'worker')}", "listeners:"]
    for lc in doc["listeners"]:
        lines.append(f"  {lc['kind']:<12} {lc['address']:<22} {plural(lc['sessions'], 'session')} now")
    hour = doc["last_hour"]
    refused = sum(hour["rejected"].values())
    lines.append(f"last hour: {plural(hour['accepted'], 'message')} accepted, {refused} commands refused")
    for why, n in hour["rejected"].items():
        lines.append(f"  {why:<28} {n}")
    q = doc["queue"]
    lines.append("queue: " + (", ".join(f"{n} {state}" for state, n in sorted(q.items())) or "empty"))
    locks = doc["lockouts"]
    lines.append(f"lockouts: {len(locks) or 'none'}")
    for lo in locks:
        lines.append(f"  {lo['source']:<28} until {utc_time(lo['until'])} (offence {lo['offences']})")
    for a in doc["accounts_under_attack"]:
        lines.append(f"  account {a['account']}: {a['failures']} failures from {a['sources']} sources")
    sus = doc["suspended"]
    lines.append("suspended accounts: " + (", ".join(f"{s['account']} ({s['by'] or 'unknown'})" for s in sus)
                                          or "none"))
    hits = doc["dnsbl_hits"]
    lines.append(f"recent DNSBL hits: {len(hits) or 'none'}")
    for h in hits:
        lines.append(f"  {utc_time(h['time'])} {h['client']:<16} {h['reason']}")
    cert = doc.get("certificate")
    if cert is None:
        lines.append("certificate: none configured")
    elif "error" in cert:
        lines.append(f"certificate: {cert['file']}: {cert['error']}")
    else:
        warn = "  <- renew it" if cert["days_left"] < 14 else ""
        lines.append(f"certificate: {cert['file']} expires {utc_time(cert['not_after'])} "
                     f"({plural(cert['days_left'], 'day')} left){warn}")
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    from yuubin.status import control_path  # (prometheus-client is only loaded when needed)
    cfg = load_config(args)
    path = control_path(cfg)
    try:
        doc = ask(str(path))
    except FileNotFoundError:
        raise CliFailure(f"no server running for {cfg.source} (no control socket {path})") from None
    except ConnectionRefusedError:
        raise CliFailure(f"no server answers on {path} (a stale socket: is the server running?)") from None
    except PermissionError:
        raise CliError(f"{path}: permission denied (run as the server's user or root)") from None
    except (TimeoutError, OSError, ValueError) as e:
        raise CliFailure(f"{path}: no usable answer: {e}") from None
    print(json.dumps(doc, indent=2) if args.json else render(doc))
    return 0


def register(sub: SubParsers) -> None:
    """Add `status`."""
    x = sub.add_parser("status", help="the running server: listeners, sessions, last hour, queue, lockouts")
    x.add_argument("--json", action="store_true", help="machine-readable output")
    x.set_defaults(func=cmd_status)
