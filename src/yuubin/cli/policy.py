"""`yuubin policy explain`: what the running config would answer one imagined client, and why."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
from typing import Any

from yuubin.cli.common import CliError, SubParsers, add_group, load_config, open_store
from yuubin.config import SUBMISSION_KINDS, Config
from yuubin.policy.explain import Explanation, explain
from yuubin.policy.pipeline import SessionFacts
from yuubin.smtp.address import Address, AddressError, parse_path


def _address(text: str, name: str, *, null_ok: bool = False) -> Address | None:
    path = text if text.startswith("<") else f"<{text}>"
    try:
        addr = parse_path(path, smtputf8=True)
    except AddressError as e:
        raise CliError(f"{name}: {text!r} is not a mail address: {e}") from None
    if addr is None and not null_ok:
        raise CliError(f"{name}: the null sender <> is not a recipient")
    return addr


def _listener(cfg: Config, kind: str) -> Any:
    for lc in cfg.listeners:
        if lc.kind == kind:
            return lc
    kinds = ", ".join(sorted({lc.kind for lc in cfg.listeners})) or "none"
    raise CliError(f"--listener: no {kind} listener in {cfg.source} (configured: {kinds})")


def _print(expl: Explanation, header: str) -> None:
    print(header)
    for step in expl.steps:
        print(f"{step.stage.upper():8} {step.subject}")
        if not step.trail:
            print("           (no checks)")
        for d in step.trail:
            print(f"           {d.check:<14} {d.verdict.value:<10} {d.reason}")
        print(f"           -> {step.reply}")
    print(f"result: {expl.verdict}")


def _as_json(expl: Explanation, header: dict[str, Any]) -> str:
    return json.dumps({
        **header,
        "steps": [{"stage": s.stage, "subject": s.subject, "reply": str(s.reply), "accepted": s.accepted,
                   "checks": [{"check": d.check, "verdict": d.verdict.value, "reason": d.reason,
                               **({"results": dict(d.results)} if d.results else {})} for d in s.trail]}
                  for s in expl.steps],
        "accepted_recipients": list(expl.recipients),
        "message_checks": list(expl.message_checks),
        "result": expl.verdict,
    }, indent=2)


def cmd_policy_explain(args: argparse.Namespace) -> int:
    from yuubin.auth.accounts import Directory
    from yuubin.dns import Resolver
    from yuubin.policy.listeners import ListenerPolicies, load_geo

    cfg = load_config(args)
    lc = _listener(cfg, args.listener)
    try:
        client = ipaddress.ip_address(args.client)
    except ValueError:
        raise CliError(f"--client: {args.client!r} is not an IP address") from None
    sender = _address(args.sender, "--from", null_ok=True)
    recipients = [a for a in (_address(t, "--to") for t in args.to) if a is not None]
    store = open_store(cfg)
    directory = Directory(store, cfg.local_domains, cfg.postmaster, cfg.mailauth.report_address)
    resolver = Resolver(list(cfg.dns.nameservers), cfg.dns.port, cfg.dns.timeout)
    broken: list[str] = []
    policies = ListenerPolicies(cfg, directory, store, resolver, load_geo(cfg),
                                lambda account, what, _facts: broken.append(f"{account}: {what}"), dry_run=True)
    trusted = any(client in net for net in cfg.trusted)
    login = args.auth
    if login and lc.kind not in SUBMISSION_KINDS:
        raise CliError(f"--auth: the {lc.kind} listener takes no logins (only submission and submissions do)")
    facts = SessionFacts("explain", lc.kind, client, trusted, tls="(assumed)" if login else None,
                         helo=args.helo, auth_user=login)
    login_ok = login is None or store.account_exists(login)
    expl = asyncio.run(explain(policies.pipeline(lc), facts, cfg.hostname, sender, recipients, login_ok))
    header = {"listener": lc.kind, "address": lc.address, "client": str(client), "trusted": trusted,
              "helo": args.helo, "auth": login}
    if args.json:
        print(_as_json(expl, header))
    else:
        where = "a trusted network" if trusted else "not a trusted network"
        who = f", logged in as {login}" if login else ""
        _print(expl, f"{lc.kind} listener {lc.address}, client {client} ({where}{who}); dry run, nothing stored")
    return 0


def register(sub: SubParsers) -> None:
    """Add the policy group: explain."""
    pol = add_group(sub, "policy", "the policy of the running config: explain")
    x = pol.add_parser("explain", help="run a listener's checks for an imagined client in dry run and say why")
    x.add_argument("--listener", default="mx", help="listener kind: mx (default), submission, submissions")
    x.add_argument("--client", required=True, metavar="IP", help="the client's address")
    x.add_argument("--helo", default="client.invalid", metavar="NAME", help="its EHLO name")
    x.add_argument("--from", dest="sender", default="", metavar="ADDR", help="MAIL FROM (default: <>)")
    x.add_argument("--to", action="append", required=True, metavar="ADDR", help="RCPT TO (repeat for more)")
    x.add_argument("--auth", metavar="USER", help="logged in as this account (submission listeners; TLS assumed)")
    x.add_argument("--json", action="store_true", help="machine-readable output")
    x.set_defaults(func=cmd_policy_explain)
