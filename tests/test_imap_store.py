"""The IMAP mailbox store on a real Maildir: folders, UIDs, MODSEQ, flags, several views, changes
behind the store's back, change notification, and kill -9 in the middle of writes."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from yuubin.delivery.maildir import Maildirs
from yuubin.durable import GroupCommitter
from yuubin.imap import store as imapstore
from yuubin.imap.store import (
    INDEX_FILE,
    Expunged,
    FolderExists,
    HasChildren,
    MailStore,
    NoSuchFolder,
    ReadOnly,
    disk_name,
    imap_name,
)

MAILBOX = "alice@example.jp"
MSG = b"From: a@example.jp\r\nTo: alice@example.jp\r\nSubject: hi\r\n\r\nbody\r\n"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "mail"


@pytest.fixture
def committer():
    c = GroupCommitter()
    yield c
    c.shutdown()


def make(root: Path, committer: GroupCommitter) -> MailStore:
    return MailStore(Maildirs(root, "mx.example.jp"), committer)


def maildir(root: Path) -> Path:
    return root / "example.jp" / "alice"


def deliver(root: Path, body: bytes = MSG, folder: str = "", name: str | None = None) -> Path:
    """What delivery (or any other Maildir writer) does: tmp/ then new/."""
    base = maildir(root) / (f".{folder}" if folder else "")
    for sub in ("tmp", "new", "cur"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    name = name or f"{time.time_ns()}.P{os.getpid()}.test,S={len(body)}"
    (base / "tmp" / name).write_bytes(body)
    os.rename(base / "tmp" / name, base / "new" / name)
    return base / "new" / name


def test_names_map_to_maildir_plus_plus_and_back():
    assert disk_name("INBOX") == "" and disk_name("inbox") == ""
    assert disk_name("A/B") == "A.B"
    assert disk_name("v1.2/x%y") == "v1%2E2.x%25y"
    assert imap_name("v1%2E2.x%25y") == "v1.2/x%y"
    assert imap_name("") == "INBOX"
    assert imap_name("INBOX.foo") == "INBOX/foo"
    for tricky in ("%2E", "%.", "a%2eb", "%25", "..", "日本/v1.2"):
        assert imap_name(disk_name(tricky)) == tricky
    for bad in ("A//B", "/A", "a\x01b"):
        with pytest.raises(imapstore.InvalidName):
            disk_name(bad)


async def test_new_account_has_special_use_folders(root, committer):
    acc = make(root, committer).account(MAILBOX)
    infos = {f.name: f for f in acc.folders()}
    assert next(iter(infos)) == "INBOX"
    for name, use in imapstore.SPECIAL_USE:
        assert infos[name].special_use == use and infos[name].exists and infos[name].subscribed
        assert (maildir(root) / f".{name}" / "cur").is_dir()
        assert (maildir(root) / f".{name}" / "maildirfolder").exists()
    assert (maildir(root) / INDEX_FILE).exists()
    assert oct((maildir(root) / INDEX_FILE).stat().st_mode & 0o777) == "0o600"


async def test_delivered_mail_gets_uids_and_moves_to_cur(root, committer):
    deliver(root)
    deliver(root, MSG + b"second\r\n")
    acc = make(root, committer).account(MAILBOX)
    view = acc.open("INBOX", readonly=False)
    assert [m.uid for m in view.messages] == [1, 2]
    assert view.uidnext == 3 and view.uidvalidity > 0
    assert view.recent == {1, 2}
    assert not list((maildir(root) / "new").iterdir())
    assert len(list((maildir(root) / "cur").iterdir())) == 2
    assert view.read(1) == MSG
    assert view.messages[0].size == len(MSG)
    st = acc.status("INBOX")
    # RECENT: what no session has announced yet (this view took both)
    assert (st.messages, st.unseen, st.uidnext, st.recent, st.deleted) == (2, 2, 3, 0, 0)
    deliver(root, MSG + b"third\r\n")
    assert acc.status("INBOX").recent == 1
    # a second session opens later: only the one nobody announced is recent for it
    assert acc.open("INBOX", readonly=False).recent == {3}
    assert acc.open("INBOX", readonly=False).recent == set()


async def test_append_is_durable_with_flags_keywords_and_internaldate(root, committer):
    acc = make(root, committer).account(MAILBOX)
    uv, uid = await acc.append("Drafts", MSG, frozenset({"\\Draft", "\\seen", "$Label1"}), 1_700_000_000.0)
    assert uid == 1
    files = list((maildir(root) / ".Drafts" / "cur").iterdir())
    assert len(files) == 1 and files[0].name.endswith(":2,DS")
    assert files[0].stat().st_mtime == 1_700_000_000.0
    view = acc.open("Drafts", readonly=True)
    assert view.uidvalidity == uv
    m = view.messages[0]
    assert m.flags == {"\\Draft", "\\Seen", "$Label1"} and m.internaldate == 1_700_000_000.0
    assert view.read(uid) == MSG
    with pytest.raises(NoSuchFolder):
        await acc.append("Nowhere", MSG, frozenset(), None)


async def test_append_of_bare_lf_counts_the_size_as_served(root, committer):
    acc = make(root, committer).account(MAILBOX)
    _, uid = await acc.append("INBOX", b"Subject: lf\n\nline\n", frozenset(), None)
    view = acc.open("INBOX", readonly=True)
    assert view.messages[0].size == len(view.read(uid)) == len(b"Subject: lf\r\n\r\nline\r\n")


async def test_bare_lf_files_are_served_with_crlf(root, committer):
    deliver(root, b"Subject: lf\n\nline\n")
    view = make(root, committer).account(MAILBOX).open("INBOX", readonly=True)
    assert view.read(1) == b"Subject: lf\r\n\r\nline\r\n"
    assert view.messages[0].size == len(b"Subject: lf\r\n\r\nline\r\n")


async def test_store_flags_in_file_name_and_modseq(root, committer):
    deliver(root)
    acc = make(root, committer).account(MAILBOX)
    view = acc.open("INBOX", readonly=False)
    before = view.highestmodseq
    r = view.store([1], "+", frozenset({"\\Seen", "\\Flagged", "work"}), None)
    assert r.updated[0].flags == {"\\Seen", "\\Flagged", "work"} and r.updated[0].modseq > before
    assert [p.name.rpartition(":2,")[2] for p in (maildir(root) / "cur").iterdir()] == ["FS"]
    r = view.store([1], "-", frozenset({"\\Flagged"}), None)
    assert r.updated[0].flags == {"\\Seen", "work"}
    r = view.store([1], "=", frozenset({"\\Answered"}), None)
    assert r.updated[0].flags == {"\\Answered"}
    assert [p.name.rpartition(":2,")[2] for p in (maildir(root) / "cur").iterdir()] == ["R"]
    # UNCHANGEDSINCE older than the message's MODSEQ: refused, reported as MODIFIED
    r = view.store([1], "+", frozenset({"\\Seen"}), unchangedsince=before)
    assert r.modified == [1] and r.updated == []
    assert view.read(1) == MSG
    with pytest.raises(ReadOnly):
        acc.open("INBOX", readonly=True).store([1], "+", frozenset({"\\Seen"}), None)


async def test_expunge_reports_through_sync_and_vanished(root, committer):
    for i in range(4):
        deliver(root, MSG + str(i).encode())
    acc = make(root, committer).account(MAILBOX)
    view = acc.open("INBOX", readonly=False)
    mark = view.highestmodseq
    view.store([2, 4], "+", frozenset({"\\Deleted"}), None)
    assert acc.status("INBOX").deleted == 2
    assert view.expunge([4, 3]) == [4]  # UID EXPUNGE: only the \Deleted among the given
    assert view.expunge() == [2]
    ch = view.sync()
    assert ch.expunged == [2, 4] and ch.expunged_seqs == [4, 2]
    assert [m.uid for m in view.messages] == [1, 3]
    assert view.vanished_since(mark) == [2, 4]
    assert len(list((maildir(root) / "cur").iterdir())) == 2
    with pytest.raises(Expunged):
        view.read(2)


async def test_expunge_takes_deleted_mail_the_view_has_not_seen_yet(root, committer):
    acc = make(root, committer).account(MAILBOX)
    a = acc.open("INBOX", readonly=False)
    _, uid = await acc.append("INBOX", MSG, frozenset({"\\Deleted"}), None)  # not yet announced to a
    assert a.expunge() == [uid]
    assert not a.sync()  # never announced, so never expunged to this session either
    assert acc.status("INBOX").messages == 0


async def test_two_views_see_each_others_changes(root, committer):
    deliver(root)
    acc = make(root, committer).account(MAILBOX)
    a = acc.open("INBOX", readonly=False)
    b = acc.open("INBOX", readonly=False)
    a.store([1], "+", frozenset({"\\Seen"}), None)
    ch = b.sync()
    assert [m.uid for m in ch.flags] == [1] and ch.flags[0].flags == {"\\Seen"}
    assert b.sync().flags == []  # reported once
    _uv, uid = await b.account.append("INBOX", MSG, frozenset(), None)
    ch = a.sync()
    assert [m.uid for m in ch.added] == [uid] and a.messages[-1].uid == uid
    assert uid in a.recent or uid in b.recent
    b.store([1], "+", frozenset({"\\Deleted"}), None)
    b.expunge()
    assert a.sync().expunged_seqs == [1]
    assert [m.uid for m in a.messages] == [uid]
    assert a.sync().flags == [] and not a.sync()


async def test_changes_behind_the_stores_back_are_noticed(root, committer, monkeypatch):
    monkeypatch.setattr(imapstore, "MTIME_TRUST", 0.0)
    deliver(root)
    deliver(root, MSG + b"2")
    acc = make(root, committer).account(MAILBOX)
    view = acc.open("INBOX", readonly=False)
    files = sorted((maildir(root) / "cur").iterdir())
    time.sleep(0.01)
    os.unlink(files[0])  # removed by hand
    os.rename(files[1], str(files[1]).rpartition(":2,")[0] + ":2,FS")  # flagged by mutt
    deliver(root, MSG + b"3")  # and a new one
    ch = view.sync()
    assert ch.expunged == [1]
    assert [(m.uid, m.flags) for m in ch.flags] == [(2, {"\\Seen", "\\Flagged"})]
    assert [m.uid for m in ch.added] == [3]


async def test_expunge_finds_a_file_renamed_behind_its_back(root, committer):
    acc = make(root, committer).account(MAILBOX)
    await acc.append("INBOX", MSG, frozenset({"\\Deleted"}), None)
    view = acc.open("INBOX", readonly=False)
    (f,) = (maildir(root) / "cur").iterdir()
    os.rename(f, str(f).rpartition(":2,")[0] + ":2,ST")  # mutt marks it seen meanwhile
    assert view.expunge() == [1]
    assert not list((maildir(root) / "cur").iterdir())  # gone, not resurrected with a new UID
    assert acc.status("INBOX").messages == 0


async def test_a_flag_change_by_another_view_wakes_a_waiting_one(root, committer, monkeypatch):
    monkeypatch.setattr(imapstore, "POLL_INTERVAL", 60.0)
    acc = make(root, committer).account(MAILBOX)
    await acc.append("INBOX", MSG, frozenset(), None)
    a, b = acc.open("INBOX", readonly=False), acc.open("INBOX", readonly=False)
    a.sync()
    waiter = asyncio.create_task(a.wait_change(10))
    await asyncio.sleep(0.05)
    b.store([1], "+", frozenset({"\\Flagged"}), None)
    await asyncio.wait_for(waiter, 2)
    assert [m.flags for m in a.sync().flags] == [{"\\Flagged"}]


async def test_fetch_cache_is_shared_kept_and_dropped_with_the_message(root, committer):
    ms = make(root, committer)
    acc = ms.account(MAILBOX)
    for _ in range(3):
        await acc.append("INBOX", MSG, frozenset(), None)
    a = acc.open("INBOX", readonly=False)
    a.remember(1, "ENVELOPE/1", b"(env one)")
    a.remember(2, "ENVELOPE/1", b"(env two)")
    assert a.cached([1, 2, 3], "ENVELOPE/1") == {1: b"(env one)", 2: b"(env two)"}  # before it is written
    a.sync()
    b = acc.open("INBOX", readonly=True)
    assert b.cached([1, 2, 3], "ENVELOPE/1") == {1: b"(env one)", 2: b"(env two)"}
    assert b.cached(range(1, 100), "ENVELOPE/1") == {1: b"(env one)", 2: b"(env two)"}  # the bulk path
    assert b.cached([1], "BODYSTRUCTURE/1") == {}
    a.store([1], "+", frozenset({"\\Deleted"}), None)
    a.expunge()
    b.remember(1, "BODYSTRUCTURE/1", b"(late)")  # for a message expunged meanwhile: never written
    b.close()
    a.close()
    ms.close()
    acc = make(root, committer).account(MAILBOX)
    c = acc.open("INBOX", readonly=True)
    assert c.cached([1, 2, 3], "ENVELOPE/1") == {2: b"(env two)"}
    assert c.cached([1], "BODYSTRUCTURE/1") == {}


async def test_odd_maildirs_from_other_tools_do_not_break_a_session(root, committer, caplog):
    deliver(root)
    acc = make(root, committer).account(MAILBOX)
    odd = os.fsencode(maildir(root) / "cur") + b"/bad\xff\x01name:2,S"
    with open(odd, "wb") as f:
        f.write(MSG)
    (maildir(root) / ".OnlyCur" / "cur").mkdir(parents=True)  # new/ and tmp/ not made yet
    view = acc.open("INBOX", readonly=False)
    assert [m.uid for m in view.messages] == [1]  # the odd name is left alone, and said so
    assert "imap_file_skipped" in caplog.text
    assert "OnlyCur" in {f.name for f in acc.folders()}
    assert acc.status("OnlyCur").messages == 0
    await acc.append("OnlyCur", MSG, frozenset(), None)
    assert acc.status("OnlyCur").messages == 1


async def test_uids_are_never_reused(root, committer):
    ms = make(root, committer)
    acc = ms.account(MAILBOX)
    _, u1 = await acc.append("INBOX", MSG, frozenset({"\\Deleted"}), None)
    view = acc.open("INBOX", readonly=False)
    view.expunge()
    ms.close()
    acc = make(root, committer).account(MAILBOX)
    _, u2 = await acc.append("INBOX", MSG, frozenset(), None)
    assert u2 > u1


async def test_copy_and_move(root, committer):
    acc = make(root, committer).account(MAILBOX)
    for i in range(3):
        await acc.append("INBOX", MSG + str(i).encode(), frozenset({"\\Seen", "kw"}), 1e9 + i)
    src = acc.open("INBOX", readonly=False)
    r = await src.copy([1, 3], "Archive")
    assert r.source == [1, 3] and r.dest == [1, 2] and r.uidvalidity == acc.status("Archive").uidvalidity
    arch = acc.open("Archive", readonly=True)
    assert [m.flags for m in arch.messages] == [{"\\Seen", "kw"}] * 2
    assert arch.read(2) == MSG + b"2" and arch.messages[1].internaldate == 1e9 + 2
    r = await src.move([2], "Trash")
    assert r.source == [2] and r.dest == [1]
    assert src.sync().expunged == [2]
    assert acc.open("Trash", readonly=True).read(1) == MSG + b"1"
    assert acc.status("INBOX").messages == 2
    with pytest.raises(NoSuchFolder):
        await src.copy([1], "Nope")


async def test_folder_create_rename_delete_subscribe(root, committer):
    acc = make(root, committer).account(MAILBOX)
    acc.create("Projects/v1.2")
    assert (maildir(root) / ".Projects.v1%2E2" / "maildirfolder").exists()
    assert (maildir(root) / ".Projects" / "cur").is_dir()  # the parent is made too
    with pytest.raises(FolderExists):
        acc.create("Projects/v1.2")
    await acc.append("Projects/v1.2", MSG, frozenset(), None)
    uv = acc.status("Projects/v1.2").uidvalidity
    with pytest.raises(HasChildren):
        acc.delete("Projects")
    acc.subscribe("Projects/v1.2", True)
    acc.rename("Projects", "Old")
    names = {f.name: f for f in acc.folders()}
    assert "Old/v1.2" in names and "Projects" not in names and names["Old"].children
    assert names["Old/v1.2"].subscribed
    st = acc.status("Old/v1.2")
    assert st.uidvalidity == uv and st.messages == 1
    acc.delete("Old/v1.2")
    with pytest.raises(NoSuchFolder):
        acc.status("Old/v1.2")
    acc.create("Old/v1.2")  # made again: a new UIDVALIDITY
    assert acc.status("Old/v1.2").uidvalidity > uv
    acc.subscribe("Gone", True)
    gone = next(f for f in acc.folders() if f.name == "Gone")
    assert gone.subscribed and not gone.exists


async def test_a_view_of_a_deleted_folder_says_so_and_does_not_spin(root, committer):
    acc = make(root, committer).account(MAILBOX)
    acc.create("Tmp")
    await acc.append("Tmp", MSG, frozenset(), None)
    view = acc.open("Tmp", readonly=False)
    acc.delete("Tmp")  # by another session
    assert view.sync().expunged == [1] and view.messages == []
    assert not view.sync()
    with pytest.raises(NoSuchFolder):
        view.store([1], "+", frozenset({"\\Seen"}), None)
    with pytest.raises(NoSuchFolder):
        await view.copy([1], "Tmp")
    t0 = time.monotonic()
    await view.wait_change(0.3)  # waits its time, no busy return
    assert time.monotonic() - t0 >= 0.25


async def test_rename_inbox_moves_its_messages(root, committer):
    acc = make(root, committer).account(MAILBOX)
    await acc.append("INBOX", MSG, frozenset(), None)
    acc.rename("INBOX", "Old mail")
    assert acc.status("INBOX").messages == 0 and acc.status("Old mail").messages == 1


async def test_wait_change_wakes_on_delivery_hook_and_on_files_from_elsewhere(root, committer):
    ms = make(root, committer)
    acc = ms.account(MAILBOX)
    view = acc.open("INBOX", readonly=False)
    t0 = time.monotonic()
    waiter = asyncio.create_task(view.wait_change(10))
    await asyncio.sleep(0.05)
    deliver(root)
    ms.delivered(MAILBOX, "")
    await asyncio.wait_for(waiter, 2)
    assert time.monotonic() - t0 < 1.0
    assert [m.uid for m in view.sync().added] == [1]
    # another process delivers: no hook, the poll notices within a second
    t0 = time.monotonic()
    waiter = asyncio.create_task(view.wait_change(10))
    await asyncio.sleep(0.05)
    deliver(root, MSG + b"x")
    await asyncio.wait_for(waiter, 3)
    assert time.monotonic() - t0 < 1.6
    assert [m.uid for m in view.sync().added] == [2]
    # nothing happens: the timeout
    t0 = time.monotonic()
    await view.wait_change(0.2)
    assert 0.15 < time.monotonic() - t0 < 1.0


async def test_a_corrupt_index_is_rebuilt_with_a_new_uidvalidity(root, committer):
    ms = make(root, committer)
    acc = ms.account(MAILBOX)
    await acc.append("INBOX", MSG, frozenset({"\\Seen"}), None)
    uv = acc.status("INBOX").uidvalidity
    ms.close()
    for suffix in ("-wal", "-shm"):
        (maildir(root) / f"{INDEX_FILE}{suffix}").unlink(missing_ok=True)
    (maildir(root) / INDEX_FILE).write_bytes(b"garbage" * 1000)
    acc = make(root, committer).account(MAILBOX)
    view = acc.open("INBOX", readonly=True)
    assert view.uidvalidity > uv
    assert [m.flags for m in view.messages] == [{"\\Seen"}]


CHILD = r"""
import asyncio, random, sys
from pathlib import Path
from yuubin.delivery.maildir import Maildirs
from yuubin.durable import GroupCommitter
from yuubin.imap.store import MailStore

root, start = Path(sys.argv[1]), int(sys.argv[2])

def say(*words):
    print(*words, flush=True)

async def main():
    acc = MailStore(Maildirs(root, "mx.example.jp"), GroupCommitter()).account("alice@example.jp")
    inbox = acc.open("INBOX", readonly=False)
    n = start
    while True:
        n += 1
        marker = f"msg-{n}"
        uv, uid = await acc.append("INBOX", b"Subject: %s\r\n\r\n%s\r\n" % (marker.encode(), marker.encode()),
                                   frozenset(), None)
        say("appended", "INBOX", uv, uid, marker)
        inbox.sync()
        r = random.random()
        if r < 0.3 and inbox.messages:
            m = random.choice(inbox.messages)
            res = await inbox.move([m.uid], "Archive")
            if res.dest:
                say("moved", "Archive", res.uidvalidity, res.dest[0], m.uid)
        elif r < 0.5 and inbox.messages:
            m = random.choice(inbox.messages)
            say("expunging", m.uid)
            inbox.store([m.uid], "+", frozenset({"\\Deleted"}), None)
            inbox.expunge([m.uid])
        elif r < 0.7 and inbox.messages:
            inbox.store([random.choice(inbox.messages).uid], "+", frozenset({"\\Seen", "kw"}), None)

asyncio.run(main())
"""


@pytest.mark.slow
async def test_kill_9_during_append_move_expunge_loses_nothing_and_reuses_no_uid(root, committer, capsys):
    import random
    import signal
    import subprocess
    import sys
    make(root, committer).account(MAILBOX).close()  # folders exist before the first child
    acked: dict[str, tuple[int, int]] = {}  # marker -> (uidvalidity, uid) in INBOX, as acknowledged
    uids_given: dict[tuple[str, int], str] = {}  # (folder, uid) -> marker
    may_be_gone: set[str] = set()
    n = 0
    for _round in range(6):
        proc = subprocess.Popen([sys.executable, "-c", CHILD, str(root), str(n)], stdout=subprocess.PIPE, text=True)
        await asyncio.sleep(random.uniform(0.4, 1.2))
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate()
        by_uid = {uid: m for m, (_uv, uid) in acked.items()}
        for line in out.splitlines():
            w = line.split()
            if w[0] == "appended":
                acked[w[4]] = (int(w[2]), int(w[3]))
                assert ("INBOX", int(w[3])) not in uids_given, "a UID given twice"
                uids_given[("INBOX", int(w[3]))] = w[4]
                by_uid[int(w[3])] = w[4]
                n = max(n, int(w[4].split("-")[1]))
            # (a message may also be one whose APPEND was cut off, numbered later by reconciliation)
            elif w[0] == "moved":
                assert ("Archive", int(w[3])) not in uids_given, "a UID given twice"
                if int(w[4]) in by_uid:
                    uids_given[("Archive", int(w[3]))] = by_uid[int(w[4])]
            elif w[0] == "expunging" and int(w[1]) in by_uid:
                may_be_gone.add(by_uid[int(w[1])])
        n += 10  # markers of appends cut off before their reply are never reused either
    assert len(acked) > 20, "the child did too little to prove anything"
    ms = make(root, committer)
    acc = ms.account(MAILBOX)
    seen: dict[str, list[tuple[str, int]]] = {}
    for folder in ("INBOX", "Archive"):
        view = acc.open(folder, readonly=True)
        on_disk = [p for sub in ("new", "cur") for p in (maildir(root) / (f".{folder}" if folder != "INBOX" else "")
                                                         / sub).iterdir()]
        assert len(view.messages) == len(on_disk), folder  # the index agrees with the files
        assert len({m.uid for m in view.messages}) == len(view.messages)
        for m in view.messages:
            marker = view.read(m.uid).split(b"\r\n")[-2].decode()
            seen.setdefault(marker, []).append((folder, m.uid))
            given = uids_given.get((folder, m.uid))
            assert given in (None, marker), f"{folder} UID {m.uid} was {given}, now {marker}"
    for marker in acked:
        if marker not in may_be_gone:
            assert marker in seen, f"{marker} lost"
    assert all(len(places) == 1 for places in seen.values()), "a message in two places"
    with capsys.disabled():
        moved = sum(1 for f, _u in uids_given if f == "Archive")
        print(f"\nkill -9: 6 rounds, {len(acked)} APPENDs acknowledged, {moved} MOVEs, {len(may_be_gone)} EXPUNGEs "
              f"begun, {sum(len(p) for p in seen.values())} messages after reopening, none lost or doubled")
    # the UIDs go on after everything handed out
    top = max(u for (f, u) in uids_given if f == "INBOX")
    _, uid = await acc.append("INBOX", MSG, frozenset(), None)
    assert uid > top


@pytest.mark.slow
async def test_speed_of_a_10000_message_folder(root, committer, capsys):
    """Timings only (printed, never asserted): the machine is shared."""
    base = maildir(root)
    for sub in ("tmp", "new", "cur"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    for i in range(10_000):
        body = MSG + b"%d\r\n" % i * (i % 50)
        (base / "new" / f"1700000000.M{i}P1.test,S={len(body)}").write_bytes(body)
    ms = make(root, committer)
    t = time.perf_counter()
    acc = ms.account(MAILBOX)
    view = acc.open("INBOX", readonly=False)
    first = time.perf_counter() - t
    assert len(view.messages) == 10_000
    ms.close()
    ms = make(root, committer)
    acc = ms.account(MAILBOX)
    t = time.perf_counter()
    view = acc.open("INBOX", readonly=False)
    again = time.perf_counter() - t
    t = time.perf_counter()
    acc.open("INBOX", readonly=False).close()
    second = time.perf_counter() - t
    t = time.perf_counter()
    view.sync()
    idle_sync = time.perf_counter() - t
    deliver(root)
    t = time.perf_counter()
    ch = view.sync()
    new_sync = time.perf_counter() - t
    assert len(ch.added) == 1
    t = time.perf_counter()
    view.store([m.uid for m in view.messages[:1000]], "+", frozenset({"\\Seen"}), None)
    store_1000 = time.perf_counter() - t
    other = acc.open("INBOX", readonly=False)
    view.store([m.uid for m in view.messages[:1000]], "+", frozenset({"$Important"}), None)
    t = time.perf_counter()
    assert len(other.sync().flags) == 1000
    flag_sync = time.perf_counter() - t
    with capsys.disabled():
        print(f"\n10,000 messages: first open (numbering, reading sizes) {first:.2f}s, open {again*1000:.0f}ms, "
              f"another session's open {second*1000:.1f}ms, "
              f"sync with no change {idle_sync*1000:.1f}ms, sync with one new {new_sync*1000:.0f}ms, "
              f"STORE +\\Seen on 1,000 {store_1000*1000:.0f}ms, another view's sync of 1,000 flag changes "
              f"{flag_sync*1000:.0f}ms")


def test_mail_delivered_by_the_server_wakes_a_waiting_view_at_once(make_server, monkeypatch):
    """The wiring in app.py: LocalDelivery tells the MailStore, which wakes IDLE without polling."""
    import smtplib
    monkeypatch.setattr(imapstore, "POLL_INTERVAL", 60.0)  # only the hook can wake it in time
    srv = make_server()
    app = srv.server
    box = "alice@example.test"

    async def open_view():
        return app.mailstore.account(box).open("INBOX", readonly=False)

    view = srv.call(open_view)

    async def wait_for_mail() -> float:
        t0 = time.monotonic()
        await view.wait_change(10)
        return time.monotonic() - t0

    fut = asyncio.run_coroutine_threadsafe(wait_for_mail(), srv.loop)
    time.sleep(0.1)
    with smtplib.SMTP("127.0.0.1", srv.port("mx"), local_hostname="client.example", timeout=10) as s:
        t0 = time.monotonic()
        s.sendmail("someone@remote.example", [box], b"Subject: idle\r\n\r\nhello\r\n")
    fut.result(5)
    assert time.monotonic() - t0 < 1.0

    async def sync():
        return view.sync()

    ch = srv.call(sync)
    assert len(ch.added) == 1 and b"hello" in view.read(ch.added[0].uid)
