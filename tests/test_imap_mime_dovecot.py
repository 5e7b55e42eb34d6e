"""Differential test of imap/mime.py against Dovecot: the same corpus (tests/data/mime/*.eml) in a
private Dovecot on loopback, the same FETCH items, both answers parsed by imapclient's response
parser and compared as structures. Where we differ on purpose, KNOWN lists why with the RFC."""

from __future__ import annotations

import imaplib
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from imapclient.response_parser import parse_fetch_response

from tests.harness import free_port
from yuubin.imap import mime

CORPUS = sorted((Path(__file__).parent / "data" / "mime").glob("*.eml"))
DOVECOT = shutil.which("dovecot") or ("/usr/sbin/dovecot" if Path("/usr/sbin/dovecot").exists() else None)
HEADER_FIELDS = "HEADER.FIELDS (FROM TO SUBJECT CONTENT-TYPE)"
HEADER_NOT = "HEADER.FIELDS.NOT (RECEIVED DATE CONTENT-TYPE)"
SECTIONS = ("1.MIME", HEADER_FIELDS, HEADER_NOT, "HEADER", "TEXT", "1", "2", "2.MIME", "2.HEADER", "2.TEXT", "2.1",
            "2.2", "3", "1.1", "2.1.MIME", "2.2.1", "4", "4.HEADER", "4.TEXT", "4.1", "4.MIME")
BINARY = ("1", "2", "3")
ITEMS = ("ENVELOPE", "BODYSTRUCTURE", "BODY", *(f"BODY[{s}]" for s in SECTIONS),
         *(f"BINARY[{p}]" for p in BINARY), *(f"BINARY.SIZE[{p}]" for p in BINARY))

# (corpus file, FETCH item) -> (why our answer differs from Dovecot's and is right, and how to turn
# ours into Dovecot's where that is a simple rule: the rest of the answer must still agree).
Adjust = Callable[[Any], Any] | None
_NESTED_END = (
    "A multipart part whose close delimiter is directly followed by its parent's delimiter: Dovecot "
    "counts the line break between them into the part; RFC 2046 5.1.1 attaches the CRLF before a "
    "delimiter to the delimiter, so the part ends at its own close delimiter. This matters for "
    "multipart/signed (RFC 1847/3156): the signed entity is exactly those octets.")


_BINARY_MULTIPART = (
    "BINARY of a multipart part: Dovecot rewrites every encoded part inside it to binary (new "
    "Content-Transfer-Encoding headers, decoded bodies). A multipart itself has no transfer encoding "
    "to undo (RFC 2045 6.4), and RFC 3516 decodes the one section asked for, so we return its octets "
    "as BODY[n] does; clients ask BINARY of leaf parts.")


# (corpus file, FETCH item) -> why Dovecot answers NO and we answer
REFUSED: dict[tuple[str, str], str] = {
    ("27-odd-transfer-encodings.eml", "BINARY[3]"):
        "BINARY of quoted-printable with an invalid escape ('=ZZ'): Dovecot refuses with NO [PARSE]; "
        "RFC 2045 6.7 (note 1) advises a decoder to keep such text as it is, which we do.",
    **{("27-odd-transfer-encodings.eml", f"BINARY.SIZE[{n}]"): (
        "BINARY.SIZE of any part of a message that has an x-uuencode part elsewhere (part 4): Dovecot "
        "answers NO [UNKNOWN-CTE] for every part; RFC 3516 makes UNKNOWN-CTE about the part asked for.")
       for n in (1, 2, 3)},
}


def _plus_crlf(v: Any) -> Any:
    return v + b"\r\n"


def _plus_two(v: Any) -> Any:
    return v + 2


KNOWN: dict[tuple[str, str], tuple[str, Adjust]] = {
    **{(f, i): (_NESTED_END, _plus_crlf) for f, i in [
        ("12-nested-deep.eml", "BODY[1]"), ("12-nested-deep.eml", "BODY[1.1]"), ("12-nested-deep.eml", "BINARY[1]"),
        ("17-prefix-boundaries.eml", "BODY[1]"),
        ("17-prefix-boundaries.eml", "BINARY[1]")]},
    **{(f, i): (_NESTED_END, _plus_two) for f, i in [
        ("12-nested-deep.eml", "BINARY.SIZE[1]"), ("17-prefix-boundaries.eml", "BINARY.SIZE[1]")]},
    ("16-odd-addresses.eml", "ENVELOPE"): (
        "Cc has empty list members (', , ,'): Dovecot shows them as MISSING_MAILBOX addresses; RFC 5322 "
        "4.4 allows such null members only as obsolete syntax that carries no address, so we leave them out.",
        None),
    ("20-valueless-param.eml", "BODYSTRUCTURE"): (
        "Content-Type 'x-thing; flag; name=\"a;b=c.txt\"': Dovecot loses its way after the valueless "
        "'flag' and shows ('b' 'c.txt'); RFC 2045 5.1 makes the quoted string one value: ('name' 'a;b=c.txt').",
        None),
    ("20-valueless-param.eml", "BODY"): ("as BODYSTRUCTURE", None),
    ("21-too-deep.eml", "BODYSTRUCTURE"): (
        "Both stop at the 100th level and show that multipart as application/octet-stream; Dovecot "
        "gives it size 0, we give its real size (RFC 9051 body-fld-octets: the size of the body, "
        "which BODY[1.1...] returns).", None),
    ("21-too-deep.eml", "BODY"): ("as BODYSTRUCTURE", None),
    **{(f, i): (_BINARY_MULTIPART, None) for f, i in [
        ("23-related-inline.eml", "BINARY[2]"), ("23-related-inline.eml", "BINARY.SIZE[2]"),
        ("24-signed.eml", "BINARY[1]"), ("24-signed.eml", "BINARY.SIZE[1]")]},
    **{("27-odd-transfer-encodings.eml", i): (
        "A message/rfc822 part whose content (here base64 text) has no blank line, so it is all header: "
        "Dovecot counts the CRLF before the next boundary into the part (2 more octets, 1 more line); "
        "RFC 2046 5.1.1 gives that CRLF to the boundary, as for every other part.", None)
       for i in ("BODYSTRUCTURE", "BODY")},
    ("27-odd-transfer-encodings.eml", "BODY[1]"): ("as its BODYSTRUCTURE", _plus_crlf),
    ("27-odd-transfer-encodings.eml", "BINARY[1]"): (
        "BINARY of a base64-encoded message/rfc822 part (which RFC 2046 5.2.1 forbids, but senders do): "
        "Dovecot sends the base64 text undecoded; RFC 3516 asks for the section with its transfer "
        "encoding undone, so we send the decoded message.", None),
    ("21-too-deep.eml", "BODY[1.1]"): (
        "Past its nesting limit Dovecot loses track of the outer boundaries and ends part 1.1 at "
        "--L20--; RFC 2046 5.1.1 ends it at its own close delimiter --L2--.", None),
}


def _config(base: Path, port: int) -> str:
    if os.geteuid() == 0:
        # Dovecot refuses uid 0 for mail; its own unprivileged user owns the test mail.
        mail_user = pwd.getpwnam("dovecot") if _has_user("dovecot") else pwd.getpwnam("nobody")
        internal = ""
    else:
        mail_user = pwd.getpwuid(os.getuid())
        internal = f"default_internal_user = {mail_user.pw_name}\ndefault_login_user = {mail_user.pw_name}\n"
    return f"""\
base_dir = {base}/run
state_dir = {base}/state
instance_name = yuubin-differential
protocols = imap
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain
log_path = {base}/dovecot.log
mail_location = maildir:{base}/mail/%u
first_valid_uid = {mail_user.pw_uid}
last_valid_uid = 0
{internal}passdb {{
  driver = passwd-file
  args = scheme=PLAIN {base}/passwd
}}
userdb {{
  driver = static
  args = uid={mail_user.pw_uid} gid={mail_user.pw_gid} home={base}/mail/%u
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service anvil {{
  chroot =
}}
"""


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


@pytest.fixture(scope="module")
def dovecot() -> Iterator[imaplib.IMAP4]:
    if DOVECOT is None:
        pytest.skip("dovecot is not installed (Debian package dovecot-imapd)")
    base = Path(tempfile.mkdtemp(prefix="yuubin-dovecot-"))
    base.chmod(0o755)  # Dovecot's auth and mail processes run as its own users
    (base / "mail").mkdir()
    (base / "state").mkdir()
    (base / "passwd").write_text("tester:{PLAIN}differential-secret::::::\n")
    (base / "passwd").chmod(0o644)
    if os.geteuid() == 0:
        user = pwd.getpwnam("dovecot") if _has_user("dovecot") else pwd.getpwnam("nobody")
        os.chown(base / "mail", user.pw_uid, user.pw_gid)
    port = free_port()
    (base / "dovecot.conf").write_text(_config(base, port))
    proc = subprocess.Popen([DOVECOT, "-F", "-c", str(base / "dovecot.conf")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log = (base / "dovecot.log").read_text() if (base / "dovecot.log").exists() else ""
                    err = proc.stderr.read().decode() if proc.stderr and proc.poll() is not None else ""
                    pytest.fail(f"dovecot did not start: {err} {log}")
                time.sleep(0.1)
        client = imaplib.IMAP4("127.0.0.1", port, timeout=20)
        client.login("tester", "differential-secret")
        for path in CORPUS:
            typ, data = client.append("INBOX", None, None, path.read_bytes())
            assert typ == "OK", data
        typ, data = client.select("INBOX", readonly=True)
        assert typ == "OK" and int(data[0]) == len(CORPUS), data
        yield client
        client.logout()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(base, ignore_errors=True)


def _as_imaplib(wire: bytes) -> list[Any]:
    """Our FETCH response text shaped as imaplib hands it over: (line-with-{n}, literal) pairs."""
    out: list[Any] = []
    pos = 0
    pending = b""
    for m in re.finditer(rb"\{(\d+)\}\r\n", wire):
        if m.start() < pos:
            continue
        n = int(m.group(1))
        out.append((pending + wire[pos:m.start()] + m.group(0)[:-2], wire[m.end():m.end() + n]))
        pos = m.end() + n
        pending = b""
    out.append(wire[pos:])
    return out


def _ours(raw: bytes) -> bytes:
    msg = mime.parse(raw)
    parts: list[bytes] = [
        b"ENVELOPE " + mime.envelope(msg),
        b"BODYSTRUCTURE " + mime.bodystructure(msg, extended=True),
        b"BODY " + mime.bodystructure(msg, extended=False),
    ]
    for spec in SECTIONS:
        value = mime.section(msg, spec)
        parts.append(f"BODY[{spec}] ".encode() + (b'""' if value is None else b"{%d}\r\n" % len(value) + value))
    for part in BINARY:
        value = mime.binary(msg, part)
        parts.append(f"BINARY[{part}] ".encode() + (b'""' if value is None else b"{%d}\r\n" % len(value) + value))
        size = mime.binary_size(msg, part)
        parts.append(f"BINARY.SIZE[{part}] ".encode() + (b"0" if size is None else b"%d" % size))
    return b"1 (" + b" ".join(parts) + b")"


def _fetch_dovecot(client: imaplib.IMAP4, seq: int, items: list[str]) -> dict[bytes, Any]:
    wanted = " ".join(i.replace("BODY[", "BODY.PEEK[", 1) if i.startswith("BODY[") else i for i in items)
    typ, data = client.fetch(str(seq), f"({wanted})")
    assert typ == "OK", data
    # BINARY of content with NUL comes as literal8 ~{n} (RFC 3516), which imaplib reads as text "~"
    data = [(d[0].replace(b"~{", b"{"), d[1]) if isinstance(d, tuple) else d for d in data]
    return parse_fetch_response(data)[seq]


@pytest.mark.slow
@pytest.mark.parametrize("path", CORPUS, ids=[p.name for p in CORPUS])
def test_fetch_matches_dovecot(dovecot: imaplib.IMAP4, path: Path) -> None:
    seq = CORPUS.index(path) + 1
    refused = [i for i in ITEMS if (path.name, i) in REFUSED]
    theirs = _fetch_dovecot(dovecot, seq, [i for i in ITEMS if i not in refused])
    ours = parse_fetch_response(_as_imaplib(_ours(path.read_bytes())))[1]
    for item in refused:
        typ, _ = dovecot.fetch(str(seq), f"({item})")
        assert typ == "NO", f"{path.name} {item}: Dovecot answers it now, drop it from REFUSED"
        assert ours[item.encode()] is not None
    for item in ITEMS:
        if item in refused:
            continue
        key = item.replace("BODY.PEEK[", "BODY[").encode()
        if key not in theirs:
            continue  # Dovecot gave nothing (a part that does not exist)
        known = KNOWN.get((path.name, item))
        if known:
            reason, adjust = known
            assert ours[key] != theirs[key], f"{path.name} {item}: now equal, drop it from KNOWN ({reason})"
            if adjust is not None:
                assert adjust(ours[key]) == theirs[key], f"{path.name} {item}: differs beyond {reason}"
            continue
        assert ours[key] == theirs[key], f"{path.name} {item}:\n ours   {ours[key]!r}\n theirs {theirs[key]!r}"
