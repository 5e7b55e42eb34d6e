"""The intake, driven directly: what every new message goes through, without sockets.

End-to-end tests (test_mx_policy, test_submission, test_outbound) show it wired to SMTP; these
pin down its own rules: the message stage decides, checks' headers land in the stored message,
quarantine files local copies in Junk, routes split into local and remote, a suspended
account's mail is held, a storage failure is a 4xx and stores nothing, and messages yuubin
writes itself (DSNs, notices) are routed through the directory.
"""

from __future__ import annotations

import errno
import ipaddress
from pathlib import Path

import pytest

from yuubin.auth.accounts import Directory, Resolution
from yuubin.delivery.local import LocalDelivery
from yuubin.delivery.maildir import Maildirs
from yuubin.durable import GroupCommitter
from yuubin.intake import Accepted, Intake, Refused, Trace, missing_headers, received_header
from yuubin.policy.holds import AccountHolds
from yuubin.policy.pipeline import (
    AcceptedRecipient,
    Decision,
    Pipeline,
    SessionFacts,
    Transaction,
    accept,
    quarantine,
    reject,
)
from yuubin.queue.edit import SpoolEditor
from yuubin.queue.entrylock import EntryLocks
from yuubin.queue.spool import Spool
from yuubin.smtp.address import parse_path
from yuubin.store import Store

HOST = "mx.test.example"
MESSAGE = b"From: a@remote.example\r\nSubject: hi\r\n\r\nbody\r\n"
CLIENT = ipaddress.ip_address("192.0.2.7")


class Waker:
    def __init__(self) -> None:
        self.woken: list[str | None] = []

    def wake(self, qid: str | None = None) -> None:
        self.woken.append(qid)


class MessageVerdict:
    """A message-stage check with a fixed answer, recording the transaction it saw."""

    def __init__(self, decision: Decision):
        self.decision = decision
        self.seen: list[tuple[Transaction, bytes]] = []

    async def message(self, txn: Transaction, data: bytes) -> Decision:
        self.seen.append((txn, data))
        return self.decision


class Counting:
    def __init__(self) -> None:
        self.calls = 0

    def accepted(self, txn: Transaction) -> None:
        self.calls += 1


class Parts:
    def __init__(self, root: Path):
        self.store = Store(root / "state.db")
        for account in ("alice@example.test", "bob@example.test"):
            self.store.add_account(account, "x")
        self.store.add_alias("team@example.test", ["alice@example.test", "carol@remote.example"])
        self.directory = Directory(self.store, ("example.test",), "alice@example.test")
        self.committer = GroupCommitter()
        self.spool = Spool(root / "spool", self.committer)
        self.editor = SpoolEditor(self.spool, EntryLocks(self.spool.root))
        self.holds = AccountHolds(self.store, self.editor)
        self.waker = Waker()
        self.maildirs = Maildirs(root / "mail", HOST)
        self.delivery = LocalDelivery(self.spool, self.maildirs, self.committer, self.editor, self.holds.is_held,
                                      self.waker)
        self.intake = Intake(HOST, self.spool, self.delivery, self.holds, self.directory, self.waker.wake,
                             clock=lambda: 1_800_000_000.0)
        self.root = root

    def maildir(self, mailbox: str, folder: str = "") -> Path:
        local, _, domain = mailbox.rpartition("@")
        base = self.root / "mail" / domain / local
        return base / f".{folder}" if folder else base

    def close(self) -> None:
        self.editor.close()
        self.committer.shutdown()
        self.store.close()


@pytest.fixture
def parts(tmp_path: Path):
    p = Parts(tmp_path)
    yield p
    p.close()


def transaction(rcpts: list[tuple[str, Resolution]], auth: str | None = None, sender: str = "a@remote.example",
                listener: str = "mx") -> Transaction:
    facts = SessionFacts("s1", listener, CLIENT, trusted=False, helo="client.remote.example", auth_user=auth)
    txn = Transaction(facts, parse_path(f"<{sender}>", smtputf8=False), {})
    for text, route in rcpts:
        addr = parse_path(f"<{text}>", smtputf8=False)
        assert addr is not None
        txn.recipients.append(AcceptedRecipient(addr, {}, route))
    return txn


def trace(txn: Transaction, protocol: str = "ESMTP") -> Trace:
    s = txn.session
    return Trace(protocol, s.client, s.helo, s.tls, s.auth_user, tuple(r.address.text for r in txn.recipients))


async def wait_delivered(parts: Parts, mailbox: str, folder: str = "", count: int = 1) -> list[bytes]:
    await parts.delivery.drain(timeout=5)
    new = parts.maildir(mailbox, folder) / "new"
    files = sorted(new.iterdir()) if new.exists() else []
    assert len(files) == count, files
    return [f.read_bytes() for f in files]


async def test_accepted_message_is_stored_with_received_and_delivered(parts: Parts):
    txn = transaction([("alice@example.test", Resolution(mailboxes=["alice@example.test"]))])
    hook = Counting()
    out = await parts.intake.receive(txn, MESSAGE, Pipeline("mx", accepted=[hook]), trace(txn))
    assert isinstance(out, Accepted)
    (copy,) = await wait_delivered(parts, "alice@example.test")
    assert copy.startswith(b"Return-Path: <a@remote.example>\r\nDelivered-To: alice@example.test\r\nReceived: from "
                           b"client.remote.example ([192.0.2.7])\r\n\tby mx.test.example (yuubin) with ESMTP id "
                           + out.qid.encode())
    assert copy.endswith(MESSAGE)
    assert hook.calls == 1
    assert parts.spool.ids() == []  # local-only: the entry goes once the copy is durable


async def test_a_refusal_at_the_message_stage_stores_nothing(parts: Parts):
    txn = transaction([("alice@example.test", Resolution(mailboxes=["alice@example.test"]))])
    refusal = reject("content", "test says no", 550, "5.7.1", "no")
    hook = Counting()
    out = await parts.intake.receive(txn, MESSAGE, Pipeline("mx", message=[MessageVerdict(refusal)], accepted=[hook]),
                                     trace(txn))
    assert isinstance(out, Refused) and out.decision is refusal
    assert parts.spool.ids() == []
    assert not parts.maildir("alice@example.test").exists()
    assert hook.calls == 0


async def test_the_message_stage_gets_the_envelope_and_its_headers_are_stored(parts: Parts):
    txn = transaction([("alice@example.test", Resolution(mailboxes=["alice@example.test"]))])
    check = MessageVerdict(accept("auth", "pass", headers=(b"Authentication-Results: mx.test.example; none\r\n",)))
    out = await parts.intake.receive(txn, MESSAGE, Pipeline("mx", message=[check]), trace(txn))
    assert isinstance(out, Accepted)
    seen_txn, seen_data = check.seen[0]
    assert seen_txn.sender is not None and seen_txn.sender.text == "a@remote.example"
    assert [r.address.text for r in seen_txn.recipients] == ["alice@example.test"]
    assert seen_data == MESSAGE
    (copy,) = await wait_delivered(parts, "alice@example.test")
    head = copy.split(b"\r\n\r\n")[0]
    assert head.index(b"Received: ") < head.index(b"Authentication-Results: mx.test.example; none")


async def test_quarantine_files_local_copies_in_the_junk_folder(parts: Parts):
    txn = transaction([("alice@example.test", Resolution(mailboxes=["alice@example.test"]))])
    verdict = quarantine("dmarc", "p=quarantine", headers=(b"X-Test: junk\r\n",))
    out = await parts.intake.receive(txn, MESSAGE, Pipeline("mx", message=[MessageVerdict(verdict)]), trace(txn))
    assert isinstance(out, Accepted) and out.result is not None and out.result.quarantine
    (copy,) = await wait_delivered(parts, "alice@example.test", "Junk")
    assert b"X-Test: junk\r\n" in copy
    junk = parts.maildir("alice@example.test", "Junk")
    assert (junk / "maildirfolder").exists() and (junk / "cur").is_dir() and (junk / "tmp").is_dir()
    assert list((parts.maildir("alice@example.test") / "new").iterdir()) == []


async def test_a_check_can_drop_incoming_header_fields(parts: Parts):
    """A forged Authentication-Results (folded over two lines) claiming our hostname is removed;
    one of another server, the rest of the header and the body stay byte for byte."""
    forged = b"Authentication-Results: mx.test.example;\r\n\tdkim=pass header.d=bank.example\r\n"
    other = b"Authentication-Results: mx.elsewhere.example; spf=pass\r\n"
    message = b"From: a@remote.example\r\n" + forged + other + b"Subject: hi\r\n\r\nbody\r\n" + forged
    txn = transaction([("alice@example.test", Resolution(mailboxes=["alice@example.test"]))])

    def drop(name: str, field: bytes) -> bool:
        return name == "authentication-results" and b"mx.test.example;" in field

    check = MessageVerdict(accept("auth", "pass", drop_header=drop))
    out = await parts.intake.receive(txn, message, Pipeline("mx", message=[check]), trace(txn))
    assert isinstance(out, Accepted)
    (copy,) = await wait_delivered(parts, "alice@example.test")
    head, _, body = copy.partition(b"\r\n\r\n")
    assert forged not in head + b"\r\n" and b"bank.example" not in head
    assert head.endswith(b"From: a@remote.example\r\n" + other + b"Subject: hi")
    assert body == b"body\r\n" + forged  # the body is never touched


async def test_routes_split_into_local_copies_and_remote_recipients(parts: Parts):
    team = parts.directory.resolve(parse_path("<team@example.test>", smtputf8=False))
    assert team is not None
    txn = transaction([("team@example.test", team), ("dave@far.example", Resolution(forwards=["dave@far.example"]))],
                      listener="mx")
    out = await parts.intake.receive(txn, MESSAGE, Pipeline("mx"), trace(txn))
    assert isinstance(out, Accepted)
    await wait_delivered(parts, "alice@example.test")
    env, _ = parts.spool.load(out.qid)
    assert env.local == []  # delivered, then rewritten under the entry lock
    assert [(r.to, r.rcpt) for r in env.remote] == [("carol@remote.example", "team@example.test"),
                                                    ("dave@far.example", "dave@far.example")]
    assert parts.waker.woken == [out.qid]


async def test_a_remote_only_message_wakes_the_queue_at_once(parts: Parts):
    txn = transaction([("dave@far.example", Resolution(forwards=["dave@far.example"]))])
    out = await parts.intake.receive(txn, MESSAGE, Pipeline("mx"), trace(txn))
    assert isinstance(out, Accepted)
    assert parts.waker.woken == [out.qid]
    assert parts.spool.ids() == [out.qid]


async def test_a_submission_gets_message_id_and_date_and_hides_the_client(parts: Parts):
    txn = transaction([("dave@far.example", Resolution(forwards=["dave@far.example"]))], auth="alice@example.test",
                      sender="alice@example.test", listener="submission")
    out = await parts.intake.receive(txn, MESSAGE, Pipeline("submission"), trace(txn, "ESMTPSA"))
    assert isinstance(out, Accepted)
    _env, data = parts.spool.load(out.qid)
    assert data.startswith(f"Received: by {HOST} (yuubin) with ESMTPSA id {out.qid}".encode())
    assert b"192.0.2.7" not in data and b"client.remote.example" not in data
    assert f"Message-ID: <{out.qid}@{HOST}>\r\n".encode() in data
    assert b"\r\nDate: " in data


async def test_mail_of_a_suspended_account_is_stored_held(parts: Parts):
    parts.store.set_suspended("alice@example.test", True)
    txn = transaction([("dave@far.example", Resolution(forwards=["dave@far.example"]))], auth="alice@example.test",
                      sender="alice@example.test", listener="submission")
    out = await parts.intake.receive(txn, MESSAGE, Pipeline("submission"), trace(txn, "ESMTPSA"))
    assert isinstance(out, Accepted)
    env, _ = parts.spool.load(out.qid)
    assert env.held and env.auth == "alice@example.test"


@pytest.mark.parametrize(("err", "code", "status"), [(errno.ENOSPC, 452, "4.3.1"), (errno.EDQUOT, 452, "4.3.1"),
                                                     (errno.EIO, 451, "4.3.0")])
async def test_a_storage_failure_is_a_tempfail_and_nothing_is_counted(parts: Parts, monkeypatch, err, code, status):
    def failing(env, data):
        raise OSError(err, "simulated")

    monkeypatch.setattr(parts.spool, "enqueue_store", failing)
    txn = transaction([("alice@example.test", Resolution(mailboxes=["alice@example.test"]))])
    hook = Counting()
    out = await parts.intake.receive(txn, MESSAGE, Pipeline("mx", accepted=[hook]), trace(txn))
    assert isinstance(out, Refused)
    assert out.decision.reply is not None
    assert (out.decision.reply.code, out.decision.reply.status, out.decision.check) == (code, status, "spool")
    assert hook.calls == 0


async def test_inject_routes_through_the_directory(parts: Parts):
    qid = await parts.intake.inject("team@example.test", MESSAGE)
    assert qid is not None
    (copy,) = await wait_delivered(parts, "alice@example.test")
    assert copy.startswith(b"Return-Path: <>\r\n")
    env, _ = parts.spool.load(qid)
    assert env.sender == "" and env.listener == "bounce"
    assert [r.to for r in env.remote] == ["carol@remote.example"]


async def test_inject_to_a_remote_address_goes_out_and_to_nobody_is_refused(parts: Parts):
    qid = await parts.intake.inject("someone@far.example", MESSAGE)
    assert qid is not None and parts.waker.woken == [qid]
    env, _ = parts.spool.load(qid)
    assert [r.to for r in env.remote] == ["someone@far.example"] and env.local == []
    assert await parts.intake.inject("nobody@example.test", MESSAGE) is None
    assert await parts.intake.inject("not an address", MESSAGE) is None
    assert parts.spool.ids() == [qid]


def test_received_header_shapes():
    t = Trace("ESMTPS", CLIENT, "bad\r\nhelo", "TLSv1.3 X", None, ("one@example.test",))
    h = received_header(t, HOST, "ID1", 0.0, show_submitter=False)
    assert h.startswith(b"Received: from badhelo ([192.0.2.7])\r\n\tby mx.test.example (yuubin) with ESMTPS id ID1"
                        b"\r\n\t(using TLSv1.3 X)\r\n\tfor <one@example.test>;\r\n\t")
    assert h.endswith(b"\r\n") and h.count(b"\r\n") == 5
    sub = Trace("ESMTPSA", CLIENT, "[10.0.0.2]", None, "alice@example.test", ("a@x.example", "b@x.example"))
    assert received_header(sub, HOST, "ID2", 0.0, show_submitter=False).startswith(
        b"Received: by mx.test.example (yuubin) with ESMTPSA id ID2;\r\n\t")
    assert b"[192.0.2.7]" in received_header(sub, HOST, "ID2", 0.0, show_submitter=True)


def test_missing_headers_only_adds_what_is_missing():
    assert missing_headers(b"Message-ID: <a@b>\r\nDate: x\r\n\r\nbody\r\n", "Q", HOST, 0.0) == b""
    out = missing_headers(b"Subject: s\r\n\r\nbody\r\n", "Q", HOST, 0.0)
    assert out.startswith(b"Message-ID: <Q@mx.test.example>\r\nDate: ")


async def test_an_entry_torn_after_its_local_copies_does_not_kill_delivery(parts: Parts, caplog):
    """Mixed local+remote: if the entry cannot be reread for its rewrite, the copies stay delivered
    once, the error is logged, and the delivery task ends cleanly (no retry that would copy again)."""
    team = parts.directory.resolve(parse_path("<team@example.test>", smtputf8=False))
    assert team is not None
    txn = transaction([("team@example.test", team)])
    real_edit = parts.editor.edit

    async def torn(qid, change):
        parts.spool.path(qid).write_bytes(b"garbage\n")
        return await real_edit(qid, change)

    parts.editor.edit = torn  # type: ignore[method-assign]
    out = await parts.intake.receive(txn, MESSAGE, Pipeline("mx"), trace(txn))
    assert isinstance(out, Accepted)
    await wait_delivered(parts, "alice@example.test")
    assert [t for t in parts.delivery._tasks if not t.done()] == []
    assert any("event=spool_unreadable" in r.getMessage() for r in caplog.records)


# ---- after a message is stored: the StoredHooks (DMARC report capture) ----


class Recording:
    def __init__(self, fail: bool = False) -> None:
        self.calls: list[tuple[str, list[str], bytes, dict[str, str]]] = []
        self.fail = fail

    def stored(self, qid, recipients, data, results) -> None:
        self.calls.append((qid, list(recipients), data, dict(results)))
        if self.fail:
            raise RuntimeError("hook bug")


async def test_stored_hooks_hear_of_each_stored_message_with_its_results(parts: Parts):
    first, broken, last = Recording(), Recording(fail=True), Recording()
    parts.intake.after_stored = (first, broken, last)
    txn = transaction([("alice@example.test", Resolution(mailboxes=["alice@example.test"])),
                       ("bob@example.test", Resolution(mailboxes=["bob@example.test"]))])
    check = MessageVerdict(accept("dmarc", results={"dmarc": "pass", "dmarc.domain": "remote.example"}))
    out = await parts.intake.receive(txn, MESSAGE, Pipeline("mx", message=[check]), trace(txn))
    assert isinstance(out, Accepted)  # a hook's bug does not turn the 250 into an error
    for hook in (first, broken, last):
        [(qid, rcpts, data, results)] = hook.calls
        assert qid == out.qid
        assert rcpts == ["alice@example.test", "bob@example.test"]
        assert data.startswith(b"Received: ") and data.endswith(MESSAGE)
        assert results == {"dmarc": "pass", "dmarc.domain": "remote.example"}


async def test_stored_hooks_hear_nothing_of_a_refused_message(parts: Parts):
    hook = Recording()
    parts.intake.after_stored = (hook,)
    txn = transaction([("alice@example.test", Resolution(mailboxes=["alice@example.test"]))])
    refusal = reject("content", "no", 550, "5.7.1", "no")
    await parts.intake.receive(txn, MESSAGE, Pipeline("mx", message=[MessageVerdict(refusal)]), trace(txn))
    assert hook.calls == []
