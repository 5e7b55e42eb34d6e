"""Each listener's pipeline, built from the config: the per-port table of policy.md as code.

| stage   | mx (25)                               | submission (587) / submissions (465)          |
|---------|---------------------------------------|-----------------------------------------------|
| connect | DNSBL (not for trusted networks)      | the listener's allow list                     |
| mail    | no stranger as one of our domains;    | logged in, not suspended, hourly limit, owned |
|         | SPF (not for trusted networks)        |                                               |
| rcpt    | local exists; relay only for trusted  | local exists; relay; daily recipient limit    |
| message | DKIM, ARC, DMARC (not for trusted)    | From: owned                                   |

Optional on port 25 (off by default): S25R (connect: classify the reverse DNS; RCPT: 450 or
greylist suspects) and greylisting (RCPT, after the recipient is known to exist).

`ListenerPolicies` is the one place that turns a listener's config into its pipeline, so the
server and `yuubin policy explain` run the same checks.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

from yuubin.auth.accounts import Directory
from yuubin.config import SUBMISSION_KINDS, Config, ConfigError, ListenerConfig, OutboundConfig
from yuubin.dns import DnsLookup
from yuubin.geo import AccessList, GeoDatabase, GeoError
from yuubin.mailauth.arc import verify_arc
from yuubin.mailauth.dkim import verify_message
from yuubin.policy.access import AllowList
from yuubin.policy.dnsbl import DnsblCheck, DnsblChecker
from yuubin.policy.greylist import Greylist, GreylistSettings
from yuubin.policy.mailauth import MailAuthCheck
from yuubin.policy.pipeline import ConnectCheck, Pipeline, RcptCheck, SessionFacts
from yuubin.policy.ratelimit import AccountLimits
from yuubin.policy.relay import MxRecipients, SubmissionRecipients
from yuubin.policy.s25r import S25rAllow, S25rCheck
from yuubin.policy.sender import ForeignSender, SenderOwnership
from yuubin.store import Store

OnLimit = Callable[[str, str, SessionFacts], None]  # (account, what, facts): a limit was broken


def mx_pipeline(directory: Directory, dnsbl: DnsblChecker | None, mailauth: MailAuthCheck | None = None,
                s25r: S25rCheck | None = None, greylist: Greylist | None = None) -> Pipeline:
    """Port 25. ``mailauth`` None leaves out SPF/DKIM/DMARC (unit tests of the other rules); S25R
    classifies at connect and (action "reject") answers at RCPT; greylisting runs after the
    recipient is known to exist (and after SPF, whose pass exempts the sender)."""
    connect: list[ConnectCheck] = [DnsblCheck(dnsbl)]
    rcpt: list[RcptCheck] = [MxRecipients(directory)]
    auth = [mailauth] if mailauth is not None else []
    if s25r is not None:
        connect.append(s25r)
        rcpt.append(s25r)
    if greylist is not None:
        rcpt.append(greylist)
    return Pipeline("mx", connect=connect, mail=[ForeignSender(directory), *auth], rcpt=rcpt, message=auth)


def submission_pipeline(kind: str, directory: Directory, store: Store, outbound: OutboundConfig,
                        access: AccessList, on_limit: OnLimit,
                        clock: Callable[[], float] = time.time, dry_run: bool = False) -> Pipeline:
    limits = AccountLimits(store, outbound, on_limit, clock, dry_run)
    ownership = SenderOwnership(directory)
    return Pipeline(kind, connect=[AllowList(access)], mail=[limits, ownership],
                    rcpt=[SubmissionRecipients(directory), limits], message=[ownership], accepted=[limits])


def load_geo(cfg: Config) -> GeoDatabase | None:
    """The country database, when a listener (submission or IMAP) allows by country; without its
    data such an allow list would be an open door, so a missing or broken file is a config error."""
    if not any(lc.allow_countries for lc in cfg.listeners if lc.kind in (*SUBMISSION_KINDS, "imap", "imaps")):
        return None
    try:
        return GeoDatabase.load(cfg.geo_source)
    except GeoError as e:
        raise ConfigError(str(e)) from None


class ListenerPolicies:
    """Builds the pipeline of each configured listener (the mx pipeline is shared by all mx ones)."""

    def __init__(self, cfg: Config, directory: Directory, store: Store, resolver: DnsLookup,
                 geo: GeoDatabase | None, on_limit: OnLimit, *, dry_run: bool = False):
        self.cfg = cfg
        self.dry_run = dry_run  # `policy explain`: checks that would change state only say so
        self.directory = directory
        self.store = store
        self.geo = geo
        self.on_limit = on_limit
        dnsbl = DnsblChecker(resolver, list(cfg.dnsbl_zones)) if cfg.dnsbl_zones else None
        s25r = S25rCheck(resolver, S25rAllow.parse(cfg.s25r.allow), cfg.s25r.action) if cfg.s25r.enabled else None
        suspects_greylisted = s25r is not None and cfg.s25r.action == "greylist"
        greylist = None
        if cfg.greylist.mode != "off" or suspects_greylisted:
            gl = cfg.greylist
            settings = GreylistSettings(gl.mode != "all", gl.delay, gl.expire, gl.ttl)
            greylist = Greylist(store, settings, dry_run=dry_run)
        mailauth = MailAuthCheck(
            resolver, directory, cfg.mailauth, cfg.hostname,
            verify_dkim=functools.partial(verify_message, lookup=resolver, timeout=cfg.dns.timeout),
            verify_arc=functools.partial(verify_arc, lookup=resolver, timeout=cfg.dns.timeout))
        self._mx = mx_pipeline(directory, dnsbl, mailauth, s25r, greylist)

    def pipeline(self, lc: ListenerConfig) -> Pipeline:
        if lc.kind not in SUBMISSION_KINDS:
            return self._mx
        access = AccessList(lc.allow_networks, lc.allow_countries, self.geo)
        return submission_pipeline(lc.kind, self.directory, self.store, self.cfg.outbound, access, self.on_limit,
                                   dry_run=self.dry_run)
