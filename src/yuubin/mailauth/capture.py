"""DMARC report capture: reports that arrive for the report address are parsed into state.db.

The intake tells the capture about every message it stored from a client (recipients, data,
the message stage's results). Mail to `[mailauth] report_address` at a local domain is always
delivered as mail (the Directory routes it to postmaster); it is also parsed and stored when
its own mail passed DMARC (RFC 9990: report mail must be authenticated, or anyone could write
our statistics) and the report is about one of our domains.

Parsing happens after the 250, in a thread (`asyncio.to_thread`), at most `report_parsers` at
once and at most `report_queue` waiting, so a decompression bomb or a flood of reports delays
no SMTP session; past the queue a report is only delivered, and the log says so.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence

from yuubin.mailauth.reports import AggregateReport, ReportLimits, parse_report_mail
from yuubin.store import Store

log = logging.getLogger("yuubin.mailauth")


def _q(text: str) -> str:
    """A value for a quoted log field."""
    return text.replace('"', "'").replace("\\", "/")


class ReportCapture:
    def __init__(self, store: Store, local_domains: Sequence[str], report_address: str, limits: ReportLimits,
                 parsers: int = 2, queue: int = 50, clock: Callable[[], float] = time.time):
        self.store = store  # used on the event loop only (SQLite connections stay in their thread)
        self.local_domains = frozenset(local_domains)
        self.report_address = report_address
        self.limits = limits
        self.queue = queue
        self.clock = clock
        self._parsing = asyncio.Semaphore(parsers)
        self._tasks: set[asyncio.Task[None]] = set()

    def is_report_address(self, address: str) -> bool:
        local, _, domain = address.lower().rpartition("@")
        return domain in self.local_domains and local.split("+", 1)[0] == self.report_address

    def stored(self, qid: str, recipients: Sequence[str], data: bytes, results: Mapping[str, str]) -> None:
        """The intake's hook: a message is stored. Returns at once; a report is parsed in the background."""
        if not any(self.is_report_address(r) for r in recipients):
            return
        dmarc = results.get("dmarc", "none")
        if dmarc != "pass":
            log.info('event=dmarc_report_ignored id=%s dmarc=%s reason="the report mail itself did not pass DMARC" '
                     'effect="delivered as mail, not stored"', qid, dmarc)
            return
        if len(self._tasks) >= self.queue:
            log.warning('event=dmarc_report_rejected id=%s reason=busy detail="%d report mails wait to be parsed '
                        '([mailauth] report_queue)" effect="delivered as mail, not stored"', qid, len(self._tasks))
            return
        task = asyncio.get_running_loop().create_task(self._capture(qid, data, results.get("dmarc.domain", "")))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _capture(self, qid: str, data: bytes, sender_domain: str) -> None:
        async with self._parsing:
            outcome = await asyncio.to_thread(parse_report_mail, data, self.limits)
        for name, error in outcome.rejected:
            log.warning('event=dmarc_report_rejected id=%s attachment="%s" reason=%s detail="%s" '
                        'effect="delivered as mail, not stored"', qid, _q(name), error.reason, _q(error.detail))
        for report in outcome.reports:
            self._store(qid, report, sender_domain)

    def _store(self, qid: str, report: AggregateReport, sender_domain: str) -> None:
        domain = report.policy.domain
        if not any(domain == d or domain.endswith("." + d) for d in self.local_domains):
            log.warning('event=dmarc_report_rejected id=%s reason=foreign_domain detail="the report is about %s, '
                        'not one of domains.local" effect="delivered as mail, not stored"', qid, _q(domain))
            return
        try:
            new = self.store.add_dmarc_report(report, self.clock(), qid)
        except sqlite3.Error as e:
            log.error('event=dmarc_report_store_failed id=%s org="%s" report_id="%s" error="%s" '
                      'effect="delivered as mail, not stored"', qid, _q(report.org_name), _q(report.report_id), e)
            return
        what = "dmarc_report_stored" if new else "dmarc_report_duplicate"
        log.info('event=%s id=%s org="%s" report_id="%s" domain=%s from=%s format=%s begin=%d end=%d rows=%d '
                 'messages=%d', what, qid, _q(report.org_name), _q(report.report_id), domain,
                 sender_domain or "-", report.format, report.begin, report.end, len(report.rows), report.messages)

    async def drain(self, timeout: float) -> None:
        """Let reports being parsed finish (at stop); the mail itself is already stored."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout)
