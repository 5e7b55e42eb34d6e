"""The retry and bounce rule: what one delivery attempt's results do to a spool entry.

Pure: no I/O and no clock, so every case (backoff, the cap, expiry, the one delay warning)
is a table of inputs and expected outputs. The scheduler is the I/O around it: it stores the
notices this asks for, then writes the new entry (notices first: a crash in between repeats a
DSN, it never loses one).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from yuubin.config import OutboundConfig
from yuubin.delivery.remote import Outcome
from yuubin.queue.spool import DELIVERED, FAILED, QUEUED, Envelope, RemoteRecipient

EXPIRED_STATUS = "4.4.7"

Verdict = Literal["sent", "failed", "expired", "deferred"]


@dataclass(frozen=True, slots=True)
class RecipientResult:
    """What one attempt did to one recipient (for the log)."""

    rcpt: RemoteRecipient
    outcome: Outcome
    verdict: Verdict
    retry_in: float = 0.0  # seconds until the next try, when deferred


@dataclass(frozen=True, slots=True)
class Applied:
    """An attempt's results applied to an entry: the entry to write and what must be told first."""

    env: Envelope  # the new entry: failures marked reported, the delay warning marked sent
    results: list[RecipientResult]
    newly_failed: list[RemoteRecipient]  # failed and not yet reported: a DSN (action failed) is due
    delayed: list[RemoteRecipient]  # still queued when the delay warning fell due: one DSN (delayed)
    finished: bool  # nothing left to send or deliver locally: the entry goes
    next_due: float | None  # when the entry next has something to send


def backoff(tries: int, cfg: OutboundConfig) -> float:
    """Seconds before the next try after `tries` failed ones: doubling from retry_first, capped."""
    return min(cfg.retry_first * 2 ** (tries - 1), cfg.retry_max)


def next_due(env: Envelope) -> float | None:
    """When this entry next has something to send; None when nothing is queued."""
    times = [r.next for r in env.remote if r.state == QUEUED]
    return min(times) if times else None


def apply_outcomes(env: Envelope, outcomes: Mapping[int, Outcome], now: float, cfg: OutboundConfig) -> Applied:
    """The entry after one attempt whose results are `outcomes` (by index into env.remote)."""
    remote = [dataclasses.replace(r) for r in env.remote]
    new = dataclasses.replace(env, remote=remote, extra=dict(env.extra), attempts=env.attempts + 1)
    results = []
    for i, o in outcomes.items():
        r = remote[i]
        r.tries += 1
        r.error, r.status, r.host = o.diagnostic, o.status, o.host
        if o.kind == "delivered":
            r.state = DELIVERED
            results.append(RecipientResult(r, o, "sent"))
        elif o.kind == "failed":
            r.state = FAILED
            results.append(RecipientResult(r, o, "failed"))
        elif now - env.received >= cfg.queue_lifetime:
            r.state, r.status = FAILED, EXPIRED_STATUS
            r.error = f"gave up after {cfg.queue_lifetime / 86400:g} days: {o.diagnostic}"
            results.append(RecipientResult(r, o, "expired"))
        else:
            delay = backoff(r.tries, cfg)
            r.next = now + delay
            results.append(RecipientResult(r, o, "deferred", delay))
    newly_failed = [r for r in remote if r.state == FAILED and not r.reported]
    for r in newly_failed:
        r.reported = True
    delayed: list[RemoteRecipient] = []
    if cfg.delay_warning and not new.extra.get("warned") and now - env.received >= cfg.delay_warning:
        delayed = [r for r in remote if r.state == QUEUED]
        if delayed:
            new.extra["warned"] = True
    when = next_due(new)
    return Applied(new, results, newly_failed, delayed, when is None and not new.local, when)
