"""The retry and bounce rule (queue/retry.py) as tables: no spool, no network, no clock.

Which notices a sender wants (NOTIFY) is bounce.py's business; its table is here too.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest

from yuubin.config import OutboundConfig
from yuubin.delivery.remote import Outcome, deferred, failed
from yuubin.queue.bounce import DELAYED, FAILED, wants_notice
from yuubin.queue.retry import apply_outcomes, backoff, next_due
from yuubin.queue.spool import Envelope, RemoteRecipient

T0 = 1_700_000_000.0
HOUR = 3600.0
DAY = 86400.0
CFG = OutboundConfig(retry_first=300.0, retry_max=HOUR, queue_lifetime=5 * DAY, delay_warning=4 * HOUR)

LATER = deferred("4.3.0", "try again later", "mx.remote.test")
GONE = failed("5.1.1", "no such user", "mx.remote.test")
OK = Outcome("delivered", 250, "2.0.0", "queued", "mx.remote.test")


def entry(*rcpts: RemoteRecipient, local: list[tuple[str, str]] | None = None, **kw) -> Envelope:
    return Envelope(id="q1", sender="alice@example.test", mail_params={}, local=local or [],
                    remote=list(rcpts) or [RemoteRecipient("carol@remote.test")], received=T0,
                    client="127.0.0.1", helo="pc", listener="submission", auth="alice@example.test", **kw)


@pytest.mark.parametrize(("tries", "delay"), [(1, 300.0), (2, 600.0), (3, 1200.0), (4, 2400.0), (5, HOUR),
                                              (6, HOUR), (30, HOUR)])
def test_backoff_doubles_from_retry_first_up_to_retry_max(tries, delay):
    assert backoff(tries, CFG) == delay


def test_each_deferral_schedules_the_next_try_by_the_backoff():
    env, now = entry(), T0
    seen = []
    for _ in range(6):
        applied = apply_outcomes(env, {0: LATER}, now, CFG)
        env = applied.env
        [res] = applied.results
        assert res.verdict == "deferred" and not applied.finished
        seen.append(env.remote[0].next - now)
        assert applied.next_due == env.remote[0].next == now + res.retry_in
        now = env.remote[0].next
    assert seen == [300.0, 600.0, 1200.0, 2400.0, HOUR, HOUR]
    r = env.remote[0]
    assert (r.state, r.tries, r.status, r.host, r.error) == ("queued", 6, "4.3.0", "mx.remote.test",
                                                             "451 4.3.0 try again later")
    assert env.attempts == 6


@pytest.mark.parametrize(("age", "verdict", "state"), [
    (5 * DAY - 1, "deferred", "queued"),
    (5 * DAY, "expired", "failed"),  # queue_lifetime reached: a temporary failure becomes permanent
    (9 * DAY, "expired", "failed"),
])
def test_a_deferral_after_the_queue_lifetime_is_a_failure_with_4_4_7(age, verdict, state):
    applied = apply_outcomes(entry(extra={"warned": True}), {0: LATER}, T0 + age, CFG)
    [res] = applied.results
    r = applied.env.remote[0]
    assert (res.verdict, r.state) == (verdict, state)
    if verdict == "expired":
        assert r.status == "4.4.7"
        assert r.error == "gave up after 5 days: 451 4.3.0 try again later"
        assert applied.newly_failed == [r] and applied.finished and applied.next_due is None
    else:
        assert r.status == "4.3.0" and applied.newly_failed == [] and not applied.finished


@pytest.mark.parametrize(("outcome", "state", "verdict", "newly_failed"), [
    (OK, "delivered", "sent", False),
    (GONE, "failed", "failed", True),
    (LATER, "queued", "deferred", False),
])
def test_one_result_per_recipient(outcome, state, verdict, newly_failed):
    applied = apply_outcomes(entry(), {0: outcome}, T0 + 60, CFG)
    r = applied.env.remote[0]
    assert (r.state, r.tries, applied.results[0].verdict) == (state, 1, verdict)
    assert r.error == outcome.diagnostic and r.status == outcome.status and r.host == outcome.host
    assert (applied.newly_failed == [r]) is newly_failed
    assert r.reported is newly_failed  # written only after the DSN is stored
    assert applied.finished is (state != "queued")


def test_only_recipients_in_this_attempt_change_and_the_input_stays_as_it_was():
    env = entry(RemoteRecipient("carol@remote.test"), RemoteRecipient("dave@other.test"),
                RemoteRecipient("erin@remote.test"))
    before = copy.deepcopy(env)
    applied = apply_outcomes(env, {0: OK, 2: GONE}, T0 + 60, CFG)
    assert [r.state for r in applied.env.remote] == ["delivered", "queued", "failed"]
    assert applied.env.remote[1].tries == 0 and applied.next_due == 0.0  # dave: not tried yet, due now
    assert not applied.finished
    assert env == before  # pure: the rule returns a new entry


def test_a_failure_is_reported_once():
    applied = apply_outcomes(entry(RemoteRecipient("carol@remote.test"), RemoteRecipient("dave@other.test")),
                             {0: GONE, 1: LATER}, T0 + 60, CFG)
    assert [r.to for r in applied.newly_failed] == ["carol@remote.test"]
    again = apply_outcomes(applied.env, {1: LATER}, T0 + 400, CFG)
    assert again.newly_failed == []


@pytest.mark.parametrize(("age", "expect_warning"), [
    (4 * HOUR - 1, False),
    (4 * HOUR, True),
    (2 * DAY, True),
])
def test_delay_warning_falls_due_after_delay_warning(age, expect_warning):
    applied = apply_outcomes(entry(), {0: LATER}, T0 + age, CFG)
    assert (applied.delayed == applied.env.remote) is expect_warning
    assert bool(applied.env.extra.get("warned")) is expect_warning


def test_delay_warning_exactly_once():
    env, warnings = entry(), 0
    for now in (T0 + 5 * HOUR, T0 + 6 * HOUR, T0 + DAY):
        applied = apply_outcomes(env, {0: LATER}, now, CFG)
        warnings += bool(applied.delayed)
        env = applied.env
    assert warnings == 1


@pytest.mark.parametrize("case", ["off", "nothing left queued"])
def test_no_delay_warning(case):
    cfg = dataclasses.replace(CFG, delay_warning=0.0) if case == "off" else CFG
    outcome = LATER if case == "off" else GONE
    applied = apply_outcomes(entry(), {0: outcome}, T0 + DAY, cfg)
    assert applied.delayed == [] and "warned" not in applied.env.extra


def test_an_entry_with_local_copies_pending_is_not_finished():
    applied = apply_outcomes(entry(local=[("bob@example.test", "bob@example.test")]), {0: OK}, T0 + 1, CFG)
    assert applied.next_due is None and not applied.finished


def test_next_due_is_the_earliest_queued_recipient():
    env = entry(RemoteRecipient("a@x.test", next=T0 + 50), RemoteRecipient("b@x.test", next=T0 + 10, state="failed"),
                RemoteRecipient("c@x.test", next=T0 + 20))
    assert next_due(env) == T0 + 20
    assert next_due(entry(RemoteRecipient("a@x.test", state="delivered"))) is None


@pytest.mark.parametrize(("notify", "on_failure", "on_delay"), [
    (None, True, True),  # no NOTIFY: failures, and delays at our discretion
    ("NEVER", False, False),
    ("FAILURE", True, False),
    ("DELAY", False, True),
    ("SUCCESS", False, False),
    ("SUCCESS,FAILURE,DELAY", True, True),
    ("failure,delay", True, True),
])
def test_notify_decides_which_notices_a_recipient_gets(notify, on_failure, on_delay):
    r = RemoteRecipient("carol@remote.test", params={"NOTIFY": notify} if notify else {})
    assert wants_notice(r, FAILED) is on_failure
    assert wants_notice(r, DELAYED) is on_delay
