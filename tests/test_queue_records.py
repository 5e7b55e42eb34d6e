"""Spool entries as typed records: old entries still load, and the JSON keeps its keys."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from yuubin.durable import GroupCommitter
from yuubin.queue.control import QueueControl, entry_state
from yuubin.queue.spool import MAGIC, Envelope, RemoteRecipient, Spool, SpoolCorrupt

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
