"""`yuubin mailbox import|export` against a Maildir a real Dovecot wrote (and reads back): UIDs,
UIDVALIDITY, flags, keywords, folder names and subscriptions survive the move both ways."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from imapclient import IMAPClient

from tests.harness import free_port, run_yuubin
from yuubin.delivery.maildir import Maildirs
from yuubin.durable import GroupCommitter
from yuubin.imap.dovecot import mutf7_decode, mutf7_encode, read_uidlist
from yuubin.imap.store import MailStore

DOVECOT = shutil.which("dovecot")
ADDRESS = "alice@example.test"
PASSWORD = "dovecot-test-pw"
FOLDERS = ["INBOX", "Work/v1", "Épreuves", "Archive"]


def test_modified_utf7_round_trips():
    for name in ("Épreuves", "日本語", "a&b", "plain", "x~y", "Ü&日"):
        assert mutf7_decode(mutf7_encode(name)) == name
    assert mutf7_encode("Épreuves") == "&AMk-preuves" and mutf7_encode("a&b") == "a&-b"


def test_uidlist_versions(tmp_path):
    p = tmp_path / "dovecot-uidlist"
    p.write_text("3 V1234 N7 Gabc\n1 :k1\n4 W12 :k4\n6 :k6\n6 :dup\n")
    assert read_uidlist(p) == (1234, 7, {"k1": 1, "k4": 4, "k6": 6})
    p.write_text("1 99 5\n2 k2:2,S\n")
    assert read_uidlist(p) == (99, 5, {"k2": 2})
    assert read_uidlist(tmp_path / "none") == (0, 0, {})


class Dovecot:
    """A private Dovecot on loopback: own base_dir, passwd-file, Maildirs under `mail`, no TLS."""

    def __init__(self, work: Path, mail: Path):
        self.work, self.mail = work, mail
        self.port = free_port()
        self.uid = os.getuid() or 65534  # Dovecot refuses to serve mail as root
        gid = os.getgid() or 65534
        (work / "base").mkdir(exist_ok=True)
        (work / "passwd").write_text(f"{ADDRESS}:{{PLAIN}}{PASSWORD}:{self.uid}:{gid}::{work}/home::\n")
        users = "" if os.getuid() else "default_internal_user = dovecot\ndefault_login_user = dovenull\n"
        if os.getuid():
            import getpass
            me = getpass.getuser()
            users = f"default_internal_user = {me}\ndefault_login_user = {me}\n"
        (work / "dovecot.conf").write_text(f"""
base_dir = {work}/base
state_dir = {work}/base/state
log_path = {work}/dovecot.log
protocols = imap
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain
first_valid_uid = 0
{users}mail_location = maildir:{mail}/%d/%n
passdb {{
  driver = passwd-file
  args = {work}/passwd
}}
userdb {{
  driver = passwd-file
  args = {work}/passwd
}}
service imap-login {{
  chroot =
  inet_listener imap {{
    address = 127.0.0.1
    port = {self.port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service anvil {{
  chroot =
}}
namespace inbox {{
  inbox = yes
  separator = /
}}
""")
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Dovecot:
        if os.getuid() == 0:
            subprocess.run(["chown", "-R", f"{self.uid}:{self.uid}", str(self.mail)], check=True)
        self.proc = subprocess.Popen([DOVECOT or "dovecot", "-F", "-c", str(self.work / "dovecot.conf")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return self
            except OSError:
                assert self.proc.poll() is None, self.proc.stderr.read() if self.proc.stderr else ""
                time.sleep(0.05)
        raise AssertionError("dovecot did not start")

    def __exit__(self, *exc) -> None:
        assert self.proc is not None
        self.proc.terminate()
        self.proc.wait(15)

    def client(self) -> IMAPClient:
        c = IMAPClient("127.0.0.1", self.port, ssl=False, timeout=10)
        c.login(ADDRESS, PASSWORD)
        return c


def snapshot(c: IMAPClient) -> dict[str, tuple[int, dict[int, set[str]]]]:
    """{folder: (uidvalidity, {uid: flags without \\Recent})} as an IMAP client sees them."""
    out = {}
    for name in FOLDERS:
        info = c.select_folder(name, readonly=True)
        flags = {uid: {f.decode() for f in d[b"FLAGS"]} - {"\\Recent"}
                 for uid, d in c.fetch(c.search("ALL"), ["FLAGS"]).items()} if info[b"EXISTS"] else {}
        out[name] = (int(info[b"UIDVALIDITY"]), flags)
    return out


@pytest.fixture
def work():
    """Dovecot's processes run as another user: a directory they can reach (tmp_path cannot be)."""
    d = Path(tempfile.mkdtemp(prefix="yuubin-dovecot-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.skipif(DOVECOT is None, reason="dovecot-imapd is not installed")
def test_import_from_dovecot_and_export_back(work, make_config):
    src = work / "mail"
    src.mkdir()
    with Dovecot(work, src) as dv:
        c = dv.client()
        c.create_folder("Work/v1")
        c.create_folder("Épreuves")
        c.create_folder("Archive")
        c.subscribe_folder("Work/v1")
        for i in range(5):
            c.append("INBOX", b"Subject: m%d\r\nFrom: a@example.test\r\n\r\nbody %d\r\n" % (i, i),
                     flags=[b"\\Seen", b"$Label1"] if i == 1 else [])
        c.select_folder("INBOX")
        c.add_flags([3], [b"work", b"\\Flagged"])
        c.add_flags([1, 4], [b"\\Deleted"])
        c.expunge()  # UIDs 2, 3, 5 remain: a gap that renumbering would close
        c.append("Work/v1", b"Subject: w\r\n\r\nx\r\n", flags=[b"\\Answered", b"project"])
        c.append("Épreuves", b"Subject: e\n\nLF only\n")
        before = snapshot(c)
        c.logout()
    assert sorted(before["INBOX"][1]) == [2, 3, 5]

    cfg = make_config(dns=None).write()
    make_config(dns=None).add_accounts({ADDRESS: "x" * 20}, cached=True)
    maildir = src / "example.test" / "alice"
    p = run_yuubin(["mailbox", "import", ADDRESS, str(maildir)], config=cfg)
    assert p.returncode == 0, p.stderr
    assert "INBOX: 3 messages imported" in p.stdout and "UIDs kept" in p.stdout, p.stdout

    config = make_config(dns=None).load()
    committer = GroupCommitter()
    ms = MailStore(Maildirs(config.mail_dir, config.hostname), committer)
    acc = ms.account(ADDRESS)
    for name in FOLDERS:
        view = acc.open(name, readonly=True)
        assert view.uidvalidity == before[name][0], name
        assert {m.uid: set(m.flags) for m in view.messages} == before[name][1], name
    assert acc.open("Épreuves", readonly=True).read(1) == b"Subject: e\r\n\r\nLF only\r\n"
    subs = {f.name for f in acc.folders() if f.subscribed}
    assert "Work/v1" in subs
    ms.close()

    again = run_yuubin(["mailbox", "import", ADDRESS, str(maildir)], config=cfg)
    assert again.returncode == 0 and "3 already there" in again.stdout, again.stdout
    ms = MailStore(Maildirs(config.mail_dir, config.hostname), committer)
    assert [m.uid for m in ms.account(ADDRESS).open("INBOX", readonly=True).messages] == [2, 3, 5]
    ms.close()
    committer.shutdown()

    out = work / "exported"
    p = run_yuubin(["mailbox", "export", ADDRESS, str(out / "example.test" / "alice")], config=cfg)
    assert p.returncode == 0, p.stderr
    (work / "second").mkdir()
    with (dv2 := Dovecot(work / "second", out)):
        c = dv2.client()
        after = snapshot(c)
        c.select_folder("Work/v1")
        body = c.fetch([1], ["BODY.PEEK[]"])[1][b"BODY[]"]
        c.logout()
    assert after == before
    assert body == b"Subject: w\r\n\r\nx\r\n"


def test_import_refuses_what_is_not_a_maildir(tmp_path, make_config):
    cfg = make_config(dns=None).write()
    make_config(dns=None).add_accounts({ADDRESS: "x" * 20}, cached=True)
    p = run_yuubin(["mailbox", "import", ADDRESS, str(tmp_path)], config=cfg)
    assert p.returncode == 2 and "not a Maildir" in p.stderr
    (tmp_path / "md" / "cur").mkdir(parents=True)
    p = run_yuubin(["mailbox", "import", "nobody@example.test", str(tmp_path / "md")], config=cfg)
    assert p.returncode == 2 and "no account" in p.stderr, p.stderr
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    p = run_yuubin(["mailbox", "export", ADDRESS, str(tmp_path / "full")], config=cfg)
    assert p.returncode == 2 and "not an empty directory" in p.stderr


async def test_import_run_again_after_a_crash_keeps_dovecots_uids(tmp_path):
    """Files copied (or half-copied in tmp/) before a crash, none numbered yet: the next run numbers
    them with Dovecot's UIDs instead of leaving them to get new ones."""
    from yuubin.imap.dovecot import import_maildir
    src = tmp_path / "dovecot"
    for sub in ("tmp", "new", "cur"):
        (src / sub).mkdir(parents=True)
    names = {7: "100.M1P1.host,S=20,W=21", 9: "101.M2P1.host,S=20,W=21", 12: "102.M3P1.host"}
    for uid, key in names.items():
        (src / "cur" / f"{key}:2,Sa").write_bytes(b"Subject: %d\n\nbody\n" % uid)
    (src / "dovecot-uidlist").write_text("3 V777 N13 Gx\n" + "".join(f"{u} :{k}\n" for u, k in names.items()))
    (src / "dovecot-keywords").write_text("0 $Label1\n")
    committer = GroupCommitter()
    ms = MailStore(Maildirs(tmp_path / "mail", "mx.example.test"), committer)
    acc = ms.account(ADDRESS)
    dest = Path(acc.folder_path("INBOX"))
    (dest / "cur" / f"{names[7]}:2,S").write_bytes(b"Subject: 7\n\nbody\n")  # copied, not numbered
    (dest / "tmp" / names[9]).write_bytes(b"Subj")  # half written
    report = await import_maildir(acc, src, committer)
    assert report.folders[0].kept_uids and report.folders[0].messages == 3
    view = acc.open("INBOX", readonly=True)
    assert view.uidvalidity == 777 and view.uidnext == 13
    assert [(m.uid, set(m.flags)) for m in view.messages] == [(u, {"\\Seen", "$Label1"}) for u in (7, 9, 12)]
    assert view.read(9) == b"Subject: 9\r\n\r\nbody\r\n" and view.messages[1].size == len(view.read(9))
    again = await import_maildir(acc, src, committer)
    assert again.folders[0].skipped == 3 and again.folders[0].messages == 0
    ms.close()
    committer.shutdown()
