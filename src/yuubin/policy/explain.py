"""`policy explain`: a listener's real pipeline run in dry run for one imagined client.

The admin asks "what would happen if 203.0.113.5 sent mail from a@x to b@y on port 25?" and gets
each stage (connect, HELO, AUTH, MAIL, RCPT) with every check that ran, its verdict and reason,
and the reply the client would read — the same checks, DNS lookups and allow lists the server
uses (policy/listeners.py builds both). Nothing is stored or counted: the accepted hooks (rate
counters) never run and checks that would change state (a broken sending limit suspends the
account) are built in dry-run mode and only say so. The message stage needs the content and is
listed, not run.
"""

from __future__ import annotations

from dataclasses import dataclass

from yuubin.policy.pipeline import (
    AcceptedRecipient,
    Decision,
    Pipeline,
    SessionFacts,
    StageResult,
    Transaction,
    reject,
)
from yuubin.smtp.address import Address
from yuubin.smtp.replies import RECIPIENT_OK, SENDER_OK, Reply

AUTH_OK = Reply(235, "2.7.0", "authentication successful")


@dataclass(frozen=True, slots=True)
class Step:
    """One command of the imagined session: what was asked, what each check said, the reply."""

    stage: str  # connect, helo, auth, mail, rcpt
    subject: str  # the client, the HELO name, the login, the sender or the recipient
    trail: tuple[Decision, ...]
    reply: Reply

    @property
    def accepted(self) -> bool:
        return self.reply.is_positive


@dataclass(frozen=True, slots=True)
class Explanation:
    steps: tuple[Step, ...]
    recipients: tuple[str, ...]  # the recipients that would be accepted
    message_checks: tuple[str, ...]  # the message-stage checks that would then look at the content

    @property
    def verdict(self) -> str:
        """One sentence: how the imagined transaction ends."""
        last = self.steps[-1]
        if last.stage in ("connect", "mail") and not last.accepted:
            return f"refused at {last.stage.upper()}: {last.reply}"
        if not self.recipients:
            return "no recipient accepted: the message would not be taken"
        rest = f"; then the message checks: {', '.join(self.message_checks)}" if self.message_checks else ""
        return f"DATA would be taken for {len(self.recipients)} of the recipients{rest}"


def _reply(result: StageResult, positive: Reply) -> Reply:
    d = result.decision
    if not d.accepted:
        assert d.reply is not None  # a refusal always carries its reply
        return d.reply
    return d.reply or positive


async def explain(pipeline: Pipeline, facts: SessionFacts, hostname: str, sender: Address | None,
                  recipients: list[Address], login_ok: bool = True) -> Explanation:
    """Walk the session's stages as the SMTP listener does; stop where the client would be stopped.

    `facts.auth_user` set means "logged in as"; `login_ok=False` means that login would fail
    (no such account), shown as a refused AUTH after which the session goes on unauthenticated.
    """
    steps: list[Step] = []
    connected = await pipeline.connect(facts)
    steps.append(Step("connect", str(facts.client), connected.trail,
                      _reply(connected, Reply(220, "", f"{hostname} ESMTP yuubin"))))
    if not connected.accepted:
        return Explanation(tuple(steps), (), ())
    helo = await pipeline.helo(facts)
    greets = Reply(250, "", f"{hostname} greets {facts.helo}")
    steps.append(Step("helo", facts.helo or "", helo.trail, _reply(helo, greets)))
    if facts.auth_user is not None:
        user = facts.auth_user
        if not login_ok:
            facts.auth_user = None
            nobody = reject("login", f"no account {user}", 535, "5.7.8", "authentication credentials invalid")
            assert nobody.reply is not None
            steps.append(Step("auth", user, (nobody,), nobody.reply))
        else:
            auth = await pipeline.auth(facts)
            steps.append(Step("auth", user, auth.trail, _reply(auth, AUTH_OK)))
            if not auth.accepted:
                facts.auth_user = None
    txn = Transaction(facts, sender)
    mail = await pipeline.mail(txn, sender)
    steps.append(Step("mail", f"<{sender.text if sender else ''}>", mail.trail, _reply(mail, SENDER_OK)))
    if not mail.accepted:
        return Explanation(tuple(steps), (), ())
    accepted: list[str] = []
    for rcpt in recipients:
        result = await pipeline.rcpt(txn, rcpt)
        steps.append(Step("rcpt", f"<{rcpt.text}>", result.trail, _reply(result, RECIPIENT_OK)))
        if result.accepted and result.route is not None:
            txn.recipients.append(AcceptedRecipient(rcpt, {}, result.route))
            accepted.append(rcpt.text)
    return Explanation(tuple(steps), tuple(accepted), pipeline.message_checks)
