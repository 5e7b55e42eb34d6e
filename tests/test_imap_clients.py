"""Real IMAP clients from Debian against yuubin over TLS: mbsync (isync) two-way sync and getmail6.

Each client runs as a subprocess with a private config in tmp_path, trusting the test CA.
"""

from __future__ import annotations

import imaplib
import shutil
import smtplib
import subprocess
import time
from pathlib import Path

import pytest

from tests.harness import ACCOUNTS

ALICE = "alice@example.test"
PASSWORD = ACCOUNTS[ALICE]
LISTENERS = [{"kind": "mx", "address": "127.0.0.1:0"}, {"kind": "imaps", "address": "127.0.0.1:0"}]

pytestmark = pytest.mark.slow


def _msg(n: int) -> bytes:
    return (b"From: bob@example.test\r\nTo: alice@example.test\r\nSubject: message %d\r\n"
            b"Message-ID: <c%d@example.test>\r\n\r\nbody %d\r\n" % (n, n, n))


@pytest.fixture
def cn_tls(ca, tmp_path) -> dict[str, str]:
    """A certificate with a common name: mbsync insists on one (trustme leaves it out by default)."""
    cert = ca.issue_cert("localhost", "127.0.0.1", common_name="localhost")
    cert_path, key_path = tmp_path / "cn-cert.pem", tmp_path / "cn-key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    return {"cert": str(cert_path), "key": str(key_path)}


@pytest.fixture
def server(make_server, cn_tls):
    srv = make_server(listener=LISTENERS, tls=cn_tls)
    with smtplib.SMTP("127.0.0.1", srv.port("mx"), timeout=10) as s:
        for n in (1, 2):
            s.sendmail("bob@example.test", [ALICE], _msg(n))
    srv.wait_delivered(ALICE, 2)
    return srv


@pytest.fixture
def ca_file(ca, tmp_path) -> Path:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


def _imap(server, ca_file) -> imaplib.IMAP4_SSL:
    import ssl
    ctx = ssl.create_default_context(cafile=str(ca_file))
    c = imaplib.IMAP4_SSL("127.0.0.1", server.port("imaps"), ssl_context=ctx, timeout=10)
    c.login(ALICE, PASSWORD)
    return c


def _files(d: Path) -> list[Path]:
    return sorted(p for sub in ("cur", "new") if (d / sub).exists() for p in (d / sub).iterdir())


@pytest.mark.skipif(shutil.which("mbsync") is None, reason="isync (mbsync) is not installed")
def test_mbsync_two_way_sync(server, ca_file, tmp_path):
    local = tmp_path / "local"
    local.mkdir()
    rc = tmp_path / "mbsyncrc"
    rc.write_text(f"""IMAPAccount yuubin
Host localhost
Port {server.port("imaps")}
User {ALICE}
Pass "{PASSWORD}"
SSLType IMAPS
CertificateFile {ca_file}

IMAPStore remote
Account yuubin

MaildirStore local
Path {local}/
Inbox {local}/INBOX
SubFolders Verbatim

Channel all
Far :remote:
Near :local:
Patterns *
Create Both
Expunge Both
SyncState *
Sync All
""")

    def sync() -> None:
        p = subprocess.run(["mbsync", "-c", str(rc), "-a"], capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, (p.stdout, p.stderr, server.config.data_dir)
        assert "rror" not in p.stderr, p.stderr

    sync()
    inbox = _files(local / "INBOX")
    assert len(inbox) == 2
    # mbsync keeps local files with LF line ends
    assert {b"body 1\n", b"body 2\n"} == {p.read_bytes().replace(b"\r\n", b"\n").split(b"\n\n", 1)[1] for p in inbox}
    assert (local / "Sent").is_dir() and (local / "Trash").is_dir()

    # Local changes go up: a message read and one deleted here, a draft written here.
    first, second = inbox
    first.rename(first.parent.parent / "cur" / (first.name.split(":2,")[0] + ":2,S"))
    second.rename(second.parent.parent / "cur" / (second.name.split(":2,")[0] + ":2,ST"))
    draft = local / "Drafts" / "cur" / "1700000000.draft1.host:2,D"
    draft.write_bytes(b"From: alice@example.test\r\nSubject: draft\r\n\r\nwriting\r\n")
    sync()
    c = _imap(server, ca_file)
    c.select("INBOX")
    _typ, data = c.fetch("1:*", "(FLAGS)")
    assert len(data) == 1 and b"\\Seen" in data[0], data
    c.select("Drafts")
    _typ, data = c.fetch("1:*", "(FLAGS BODY.PEEK[TEXT])")
    assert data[0][1] == b"writing\r\n" and b"\\Draft" in data[0][0]

    # Server changes come down: new mail, a flag set elsewhere, an expunge.
    c.select("INBOX")
    c.append("INBOX", None, None, _msg(3))
    c.store("1", "+FLAGS", "(\\Flagged)")
    c.logout()
    sync()
    names = [p.name for p in _files(local / "INBOX")]
    assert len(names) == 2, names
    assert any(n.endswith(":2,FS") for n in names), names
    c = _imap(server, ca_file)
    c.select("INBOX")
    c.store("1", "+FLAGS", "(\\Deleted)")
    c.expunge()
    c.logout()
    sync()
    assert len(_files(local / "INBOX")) == 1


@pytest.mark.skipif(shutil.which("getmail") is None, reason="getmail6 is not installed")
def test_getmail_retrieves_over_imaps_and_deletes(server, ca_file, tmp_path):
    import os
    import tempfile
    # getmail refuses to deliver as root: as root, it delivers as `nobody`, into a directory nobody can reach.
    root = Path(tempfile.mkdtemp(prefix="yuubin-getmail-"))
    dest = root / "gm"
    for sub in ("cur", "new", "tmp"):
        (dest / sub).mkdir(parents=True)
    for d in (root, dest, dest / "cur", dest / "new", dest / "tmp"):
        os.chmod(d, 0o777)
    as_nobody = "user = nobody\n" if os.geteuid() == 0 else ""
    gdir = tmp_path / "getmail"
    gdir.mkdir()

    def rc(delete: bool) -> Path:
        path = gdir / "getmailrc"
        path.write_text(f"""[retriever]
type = SimpleIMAPSSLRetriever
server = 127.0.0.1
port = {server.port("imaps")}
username = {ALICE}
password = {PASSWORD}
mailboxes = ("INBOX",)
ca_certs = {ca_file}

[destination]
type = Maildir
path = {dest}/
{as_nobody}
[options]
read_all = false
delete = {str(delete).lower()}
verbose = 1
""")
        return path

    def run(delete: bool) -> subprocess.CompletedProcess:
        p = subprocess.run(["getmail", "--rcfile", str(rc(delete)), "--getmaildir", str(gdir)],
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, (p.stdout, p.stderr)
        return p

    run(False)
    got = _files(dest)
    assert len(got) == 2
    assert all(b"Subject: message " in p.read_bytes() for p in got)
    run(False)  # nothing new: getmail remembers what it has by UID
    assert len(_files(dest)) == 2
    with smtplib.SMTP("127.0.0.1", server.port("mx"), timeout=10) as s:
        s.sendmail("bob@example.test", [ALICE], _msg(3))
    deadline = time.monotonic() + 10
    while len(_files(server.maildir(ALICE))) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    run(True)
    assert len(_files(dest)) == 3
    c = _imap(server, ca_file)
    typ, data = c.select("INBOX")
    assert typ == "OK" and data[0] == b"0", data  # delete = true: retrieved and removed
    c.logout()
    shutil.rmtree(root)


@pytest.mark.skipif(shutil.which("neomutt") is None or shutil.which("script") is None,
                    reason="neomutt (and script, for its terminal) are not installed")
def test_neomutt_reads_the_inbox(server, ca_file, tmp_path):
    """neomutt in a pseudo-terminal (script), driven by `push`: open INBOX over IMAPS, copy every
    message to a local mbox, quit."""
    out = tmp_path / "saved.mbox"
    rc = tmp_path / "muttrc"
    rc.write_text(f"""set imap_user = "{ALICE}"
set imap_pass = "{PASSWORD}"
set certificate_file = "{tmp_path}/certs"
set ssl_ca_certificates_file = "{ca_file}"
set ssl_verify_host = yes
set folder = "imaps://localhost:{server.port("imaps")}/"
set mbox_type = mbox
set confirmappend = no
set confirmcreate = no
set header_cache = ""
set message_cachedir = ""
""")
    push = f"<tag-pattern>~A<enter><tag-prefix><copy-message>{out}<enter><quit>"
    cmd = f"neomutt -n -F {rc} -f imaps://localhost:{server.port('imaps')}/INBOX -e 'push \"{push}\"'"
    p = subprocess.run(["script", "-qec", cmd, "/dev/null"], capture_output=True, timeout=60,
                       env={"TERM": "xterm", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert out.exists(), (p.returncode, p.stdout[-2000:])
    data = out.read_bytes()
    assert data.count(b"Subject: message ") == 2 and b"body 1" in data and b"body 2" in data
