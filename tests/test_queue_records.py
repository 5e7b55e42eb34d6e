"""Spool entries as typed records (old entries still load, the JSON keeps its keys) and the one
locked way to edit them (SpoolEditor), which the scheduler, containment and `yuubin queue` share.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from yuubin.durable import GroupCommitter
from yuubin.policy.holds import hold_account_mail
from yuubin.queue.control import QueueControl, entry_state
from yuubin.queue.edit import KEEP, REMOVE, Keep, Rewrite, SpoolEditor, Unreadable
from yuubin.queue.entrylock import EntryLocks
from yuubin.queue.spool import MAGIC, Envelope, RemoteRecipient, Spool, SpoolCorrupt, new_id

# An entry as the previous release wrote it: a recipient only has the keys it had reached.
OLD_ENTRY = MAGIC + json.dumps({
    "id": "0000000000000001abcd001", "sender": "alice@example.test", "mail_params": {"RET": "HDRS"},
    "local": [], "remote": [
        {"to": "carol@remote.test", "params": {"NOTIFY": "FAILURE,DELAY"}, "rcpt": "carol@remote.test"},
        {"to": "dave@other.test", "params": {}, "rcpt": "fwd@example.test", "tries": 2,
         "error": "451 4.3.0 later", "status": "4.3.0", "host": "mx.other.test[127.1.0.7]:25",
         "next": 1700000600.5},
        {"to": "erin@gone.test", "params": {}, "rcpt": "erin@gone.test", "tries": 1, "error": "550 5.1.1 no",
         "status": "5.1.1", "host": "mx.gone.test", "state": "failed", "reported": True},
        {"to": "fred@remote.test", "params": {}, "rcpt": "fred@remote.test", "tries": 1, "state": "delivered",
         "error": "250 2.0.0 ok", "status": "2.0.0", "host": "mx.remote.test"},
    ],
    "received": 1700000000.0, "client": "127.0.0.1", "helo": "pc", "listener": "mx", "size": 5, "auth": None,
    "trusted": True, "held": False, "attempts": 3, "extra": {"warned": True},
}, separators=(",", ":")).encode() + b"\n" + b"hello"

KEYS = ["to", "params", "rcpt", "state", "tries", "next", "error", "status", "host", "reported"]


@pytest.fixture
def spool(tmp_path: Path):
    committer = GroupCommitter(workers=1)
    yield Spool(tmp_path / "spool", committer)
    committer.shutdown()


@pytest.fixture
def editor(spool: Spool):
    ed = SpoolEditor(spool, EntryLocks(spool.root))
    yield ed
    ed.close()


def store(spool: Spool, **kw) -> Envelope:
    fields = dict(id=new_id(), sender="alice@example.test", mail_params={}, local=[],
                  remote=[RemoteRecipient("carol@remote.test")], received=1700000000.0, client="127.0.0.1",
                  helo="pc", listener="submission", auth="alice@example.test")
    fields.update(kw)
    env = Envelope(**fields)
    asyncio.run(spool.store(env, b"Subject: x\r\n\r\nbody\r\n"))
    return env


# ---- the record format ----

def test_an_entry_written_by_the_previous_release_loads(spool: Spool):
    spool.path("0000000000000001abcd001").write_bytes(OLD_ENTRY)
    env, data = spool.load("0000000000000001abcd001")
    assert data == b"hello" and env.attempts == 3 and env.extra == {"warned": True}
    fresh, deferred, failed, sent = env.remote
    assert fresh == RemoteRecipient("carol@remote.test", params={"NOTIFY": "FAILURE,DELAY"},
                                    rcpt="carol@remote.test")  # every missing key is its default
    assert (fresh.state, fresh.tries, fresh.next, fresh.error, fresh.reported) == ("queued", 0, 0.0, "", False)
    assert (deferred.state, deferred.tries, deferred.next, deferred.rcpt) == ("queued", 2, 1700000600.5,
                                                                              "fwd@example.test")
    assert (failed.state, failed.reported, failed.status) == ("failed", True, "5.1.1")
    assert sent.state == "delivered"
    assert entry_state(env) == "deferred"


def test_a_recipient_without_rcpt_takes_its_address():
    assert RemoteRecipient.from_json({"to": "x@far.test"}).rcpt == "x@far.test"


def test_the_json_keeps_the_key_names_an_older_release_reads(spool: Spool):
    spool.path("0000000000000001abcd001").write_bytes(OLD_ENTRY)
    env, _data = spool.load("0000000000000001abcd001")
    line = env.encode()
    raw = json.loads(line[len(MAGIC):])
    assert list(raw) == ["id", "sender", "mail_params", "local", "remote", "received", "client", "helo",
                         "listener", "size", "auth", "trusted", "held", "attempts", "extra"]
    assert all(list(r) == KEYS for r in raw["remote"])
    old = json.loads(OLD_ENTRY[len(MAGIC):OLD_ENTRY.index(b"\n")])
    for written, before in zip(raw["remote"], old["remote"], strict=True):
        assert {k: written[k] for k in before} == before  # what was there is unchanged
    assert Envelope.decode(line) == env


@pytest.mark.parametrize("bad", [
    {"params": {}},  # no address
    {"to": "x@far.test", "state": "bounced"},
    {"to": "x@far.test", "params": ["NOTIFY"]},
    {"to": "x@far.test", "tries": "many"},
    "x@far.test",
])
def test_a_malformed_recipient_makes_the_entry_corrupt(spool: Spool, bad):
    raw = json.loads(OLD_ENTRY[len(MAGIC):OLD_ENTRY.index(b"\n")])
    raw["remote"] = [bad]
    spool.path("q1").write_bytes(MAGIC + json.dumps(raw).encode() + b"\nhello")
    with pytest.raises(SpoolCorrupt):
        spool.load("q1")


def test_queue_tools_show_typed_records(spool: Spool):
    spool.path("0000000000000001abcd001").write_bytes(OLD_ENTRY)
    spool.committer.shutdown()
    ctl = QueueControl(spool.root)
    try:
        row = ctl.row(ctl.entries()[0][0], now=1700000060.0)
        assert row["recipients"] == ["carol@remote.test", "dave@other.test"] and row["state"] == "deferred"
        assert row["next_attempt"] == 0.0 and row["last_error"] == "451 4.3.0 later"
        shown = ctl.show_text("0000000000000001abcd001")
        assert "dave@other.test  queued  tries=2" in shown and '"rcpt": "fwd@example.test"' in shown
    finally:
        ctl.close()


# ---- one locked edit ----

async def test_edits_of_one_entry_take_turns(spool: Spool, editor: SpoolEditor):
    env = await asyncio.to_thread(store, spool)
    order: list[str] = []

    def adder(name: str):
        async def change(e: Envelope, _data: bytes):
            order.append(f"{name} sees {e.attempts}")
            await asyncio.sleep(0.05)  # another edit started now must wait, then see this one's result
            e.attempts += 1
            return Rewrite(e)
        return change

    await asyncio.gather(editor.edit(env.id, adder("a")), editor.edit(env.id, adder("b")))
    assert order == ["a sees 0", "b sees 1"]
    assert spool.load(env.id)[0].attempts == 2


async def test_edit_results(spool: Spool, editor: SpoolEditor):
    env = await asyncio.to_thread(store, spool)

    async def keep(_e: Envelope, _d: bytes):
        return KEEP

    async def remove(_e: Envelope, _d: bytes):
        return REMOVE

    async def change_other_entry(e: Envelope, _d: bytes):
        e.id = "someone-else"
        return Rewrite(e)

    assert isinstance(await editor.edit(env.id, keep), Keep)
    with pytest.raises(ValueError):
        await editor.edit(env.id, change_other_entry)
    assert spool.load(env.id)[0].id == env.id
    assert await editor.edit(env.id, remove) is REMOVE
    assert not spool.path(env.id).exists()
    assert await editor.edit(env.id, keep) is None  # gone: nothing called, nothing written
    assert editor._in_process == {}  # the in-process lock went with its entry

    spool.path("torn").write_bytes(MAGIC + b"{not json\nxx")
    with pytest.raises(Unreadable):
        await editor.edit("torn", keep)


def test_sync_edits_and_remove_for_the_queue_tools(spool: Spool, editor: SpoolEditor):
    env = store(spool)

    def hold(e: Envelope, _d: bytes):
        e.held = True
        return Rewrite(e)

    assert isinstance(editor.edit_sync(env.id, hold), Rewrite)
    assert spool.load(env.id)[0].held
    spool.path("torn").write_bytes(b"garbage")
    removed = editor.remove_sync("torn")
    assert removed is not None and removed.env is None and not spool.path("torn").exists()
    removed = editor.remove_sync(env.id)
    assert removed is not None and removed.env is not None and removed.env.held
    assert editor.remove_sync(env.id) is None


async def test_hold_account_mail_holds_only_that_accounts_entries(spool: Spool, editor: SpoolEditor):
    mine = [await asyncio.to_thread(store, spool) for _ in range(2)]
    other = await asyncio.to_thread(store, spool, auth="bob@example.test")
    spool.path("torn").write_bytes(b"garbage")  # skipped, not fatal
    assert await hold_account_mail(editor, "alice@example.test") == 2
    assert [spool.load(e.id)[0].held for e in [*mine, other]] == [True, True, False]
    assert await hold_account_mail(editor, "alice@example.test") == 0  # already held
    assert await hold_account_mail(editor, "alice@example.test", held=False) == 2
    assert not any(spool.load(e.id)[0].held for e in mine)
