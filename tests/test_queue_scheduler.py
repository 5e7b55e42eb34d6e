"""The scheduler with an injected clock and a scripted SMTP client: days of retries in a second.

With the production settings (first retry after 5 minutes, warning after 4 hours, give up after
5 days) and no network: the clock is moved by hand and the scheduler woken.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from yuubin.config import OutboundConfig
from yuubin.delivery.remote import Outcome, SmtpTarget, deferred
from yuubin.durable import GroupCommitter
from yuubin.queue.edit import SpoolEditor
from yuubin.queue.entrylock import EntryLocks
from yuubin.queue.scheduler import OutboundScheduler
from yuubin.queue.signal import QueueSignal
from yuubin.queue.spool import Envelope, RemoteRecipient, Spool, new_id

T0 = 1_700_000_000.0
HOUR = 3600.0
DAY = 86400.0
CFG = OutboundConfig()  # the defaults: retry 5m doubling to 1h, delay warning 4h, lifetime 5d


class ScriptedClient:
    """Stands in for SmtpClient: answers every recipient with `reply`, records each attempt."""

    def __init__(self, reply: Outcome):
        self.reply = reply
        self.attempts: list[list[str]] = []

    async def send(self, target, sender, recipients, data, mail_params, qid) -> list[Outcome]:
        self.attempts.append([rcpt for rcpt, _params in recipients])
        return [self.reply] * len(recipients)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


class Harness:
    def __init__(self, root: Path, client: ScriptedClient, held: bool = False, route: bool = True):
        self.committer = GroupCommitter(workers=1)
        self.spool = Spool(root, self.committer)
        self.editor = SpoolEditor(self.spool, EntryLocks(root))
        self.signal = QueueSignal()
        self.clock = Clock()
        self.client = client
        self.dsns: list[tuple[str, bytes]] = []
        self.route = route
        relay = SmtpTarget("relay.test", "192.0.2.1", 587, "starttls")  # no MX lookups: no router needed
        self.scheduler = OutboundScheduler(self.spool, self.editor, CFG, "mx.test.example", None, client, relay,
                                           self.signal, self.inject, lambda env: held, clock=self.clock)

    async def inject(self, to: str, data: bytes) -> str | None:
        self.dsns.append((to, data))
        return new_id() if self.route else None

    async def store(self) -> Envelope:
        env = Envelope(id=new_id(), sender="alice@example.test", mail_params={}, local=[],
                       remote=[RemoteRecipient("carol@remote.test")], received=T0, client="127.0.0.1",
                       helo="pc", listener="submission", auth="alice@example.test")
        await self.spool.store(env, b"Subject: slow\r\n\r\nbody\r\n")
        self.signal.wake(env.id)
        return env

    async def at(self, when: float, attempts: int) -> None:
        """Move the clock, wake the scheduler, and wait until it has made `attempts` in all."""
        self.clock.now = when
        self.signal.wake()
        for _ in range(500):
            await asyncio.sleep(0.01)
            if len(self.client.attempts) >= attempts and not self.scheduler._jobs:
                return
        raise AssertionError(f"{len(self.client.attempts)} attempts, expected {attempts}")

    async def close(self) -> None:
        await self.scheduler.stop(grace=1)
        self.editor.close()
        self.committer.shutdown()


@pytest.fixture
async def harness(tmp_path: Path):
    made: list[Harness] = []

    def make(client: ScriptedClient, **kw) -> Harness:
        h = Harness(tmp_path / "spool", client, **kw)
        h.scheduler.start()
        made.append(h)
        return h

    yield make
    for h in made:
        await h.close()


async def test_retries_warning_and_expiry_follow_the_clock(harness):
    h = harness(ScriptedClient(deferred("4.3.0", "try again later")))
    env = await h.store()
    await h.at(T0, 1)
    [r] = h.spool.load(env.id)[0].remote
    assert (r.tries, r.next) == (1, T0 + 300)

    await h.at(T0 + 299, 1)
    await asyncio.sleep(0.05)
    assert len(h.client.attempts) == 1  # not due yet: nothing sent

    await h.at(T0 + 300, 2)
    assert h.spool.load(env.id)[0].remote[0].next == T0 + 300 + 600
    assert h.dsns == []

    await h.at(T0 + 4 * HOUR, 3)  # past delay_warning: one "still trying" notice
    [(to, warning)] = h.dsns
    assert to == "alice@example.test" and b"Action: delayed" in warning and b"Will-Retry-Until:" in warning

    await h.at(T0 + 5 * HOUR, 4)
    assert len(h.dsns) == 1  # the warning is not repeated

    await h.at(T0 + 5 * DAY, 5)  # queue_lifetime: the deferral becomes a failure
    assert len(h.dsns) == 2
    final = h.dsns[1][1]
    assert b"Action: failed" in final and b"Status: 4.4.7" in final and b"gave up after 5 days" in final
    assert not h.spool.path(env.id).exists()


async def test_a_held_entry_is_never_tried(harness):
    h = harness(ScriptedClient(deferred("4.3.0", "later")), held=True)
    env = await h.store()
    await h.at(T0 + DAY, 0)
    await asyncio.sleep(0.1)
    assert h.client.attempts == [] and h.spool.path(env.id).exists()


async def test_a_dsn_without_a_route_is_logged_and_the_entry_finishes(harness, caplog):
    h = harness(ScriptedClient(Outcome("failed", 550, "5.1.1", "no such user")), route=False)
    with caplog.at_level(logging.INFO, logger="yuubin.outbound"):
        env = await h.store()
        await h.at(T0, 1)
        for _ in range(100):
            if not h.spool.path(env.id).exists():
                break
            await asyncio.sleep(0.01)
    assert not h.spool.path(env.id).exists()
    assert len(h.dsns) == 1
    assert any("event=bounce_undeliverable" in r.getMessage() and env.id in r.getMessage()
               for r in caplog.records)
