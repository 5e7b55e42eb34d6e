"""Each listener's pipeline, built from the config: the per-port table of policy.md as code.

| stage   | mx (25)                               | submission (587) / submissions (465)          |
|---------|---------------------------------------|-----------------------------------------------|
| connect | DNSBL (not for trusted networks)      | the listener's allow list                     |
| mail    | no stranger as one of our domains;    | logged in, not suspended, hourly limit, owned |
|         | SPF (not for trusted networks)        |                                               |
| rcpt    | local exists; relay only for trusted  | local exists; relay; daily recipient limit    |
| message | DKIM, ARC, DMARC (not for trusted)    | From: owned                                   |
"""

from __future__ import annotations

import time
from collections.abc import Callable

from yuubin.auth.accounts import Directory
from yuubin.config import OutboundConfig
from yuubin.geo import AccessList
from yuubin.policy.access import AllowList
from yuubin.policy.dnsbl import DnsblCheck, DnsblChecker
from yuubin.policy.mailauth import MailAuthCheck
from yuubin.policy.pipeline import Pipeline, SessionFacts
from yuubin.policy.ratelimit import AccountLimits
from yuubin.policy.relay import MxRecipients, SubmissionRecipients
from yuubin.policy.sender import ForeignSender, SenderOwnership
from yuubin.store import Store


def mx_pipeline(directory: Directory, dnsbl: DnsblChecker | None, mailauth: MailAuthCheck | None = None) -> Pipeline:
    """The mx's checks; ``mailauth`` None leaves out SPF/DKIM/DMARC (unit tests of the other rules)."""
    auth = [mailauth] if mailauth is not None else []
    return Pipeline("mx", connect=[DnsblCheck(dnsbl)], mail=[ForeignSender(directory), *auth],
                    rcpt=[MxRecipients(directory)], message=auth)


def submission_pipeline(kind: str, directory: Directory, store: Store, outbound: OutboundConfig,
                        access: AccessList, on_limit: Callable[[str, str, SessionFacts], None],
                        clock: Callable[[], float] = time.time) -> Pipeline:
    limits = AccountLimits(store, outbound, on_limit, clock)
    ownership = SenderOwnership(directory)
    return Pipeline(kind, connect=[AllowList(access)], mail=[limits, ownership],
                    rcpt=[SubmissionRecipients(directory), limits], message=[ownership], accepted=[limits])
