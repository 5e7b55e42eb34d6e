"""CPU per message that inbound mail authentication adds on the mx (SPF, DKIM, ARC, DMARC).

Drives the mx's `MailAuthCheck` directly (MAIL stage, then message stage) for a realistic
message: 2 KiB body, one rsa-sha256 (2048-bit) DKIM signature made with dkimpy, SPF with two
`include:`s, a DMARC p=reject record — all served by the test DNS server on loopback and asked
through yuubin's real `Resolver` (so its cache behaves as in the server). Prints CPU and wall
time per message for: SPF alone, the whole check, and the whole check of an unsigned message.

    .venv/bin/python bench/mailauth_cpu.py [--messages N]

Needs the test extra (dnslib) and runs from the repository root.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import functools
import ipaddress
import logging
import sys
import tempfile
import time
from pathlib import Path

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.dnsserver import TestDNSServer  # noqa: E402
from yuubin.auth.accounts import Directory  # noqa: E402
from yuubin.config import MailauthConfig  # noqa: E402
from yuubin.dns import Resolver  # noqa: E402
from yuubin.mailauth.arc import verify_arc  # noqa: E402
from yuubin.mailauth.dkim import verify_message  # noqa: E402
from yuubin.policy.mailauth import MailAuthCheck  # noqa: E402
from yuubin.policy.pipeline import SessionFacts, Transaction  # noqa: E402
from yuubin.smtp.address import parse_path  # noqa: E402
from yuubin.store import Store  # noqa: E402

CLIENT = "192.0.2.10"


def zone() -> tuple[dict[tuple[str, str], str], bytes]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption())
    der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    records = {
        ("sender.example", "TXT"): "v=spf1 include:_spf1.sender.example include:_spf2.sender.example -all",
        ("_spf1.sender.example", "TXT"): "v=spf1 ip4:198.51.100.0/24 ip4:203.0.113.0/24 -all",
        ("_spf2.sender.example", "TXT"): f"v=spf1 ip4:{CLIENT}/32 -all",
        ("_dmarc.sender.example", "TXT"): "v=DMARC1; p=reject; rua=mailto:dmarc@sender.example",
        ("s1._domainkey.sender.example", "TXT"): "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode(),
    }
    return records, pem


def message(pem: bytes | None) -> bytes:
    body = (b"x" * 76 + b"\r\n") * 26  # 2 KiB
    msg = (b"From: Bob <bob@sender.example>\r\nTo: alice@example.test\r\nSubject: bench\r\n"
           b"Date: Sat, 28 Nov 2026 05:00:00 +0000\r\nMessage-ID: <bench@sender.example>\r\n\r\n" + body)
    if pem is None:
        return msg
    return dkim.sign(msg, b"s1", b"sender.example", pem,
                     include_headers=[b"from", b"to", b"subject", b"date", b"message-id"]) + msg


async def measure(check: MailAuthCheck, data: bytes | None, n: int) -> tuple[float, float, str]:
    """(CPU µs, wall µs) per message and the last DMARC result; data None: the MAIL stage only."""
    cpu0, wall0 = time.process_time(), time.perf_counter()
    dmarc = "-"
    for _ in range(n):
        facts = SessionFacts("bench", "mx", ipaddress.ip_address(CLIENT), False, helo="mta.sender.example")
        txn = Transaction(facts, parse_path("<bob@sender.example>", smtputf8=False))
        await check.mail(txn, txn.sender)
        if data is not None:
            dmarc = (await check.message(txn, data)).results["dmarc"]
    return (time.process_time() - cpu0) / n * 1e6, (time.perf_counter() - wall0) / n * 1e6, dmarc


async def main(n: int) -> None:
    records, pem = zone()
    with TestDNSServer() as dns, tempfile.TemporaryDirectory() as tmp:
        for (name, rdtype), value in records.items():
            dns.add(name, rdtype, value)
        store = Store(Path(tmp) / "state.db")
        resolver = Resolver(["127.0.0.1"], dns.port, 2.0)
        check = MailAuthCheck(resolver, Directory(store, ("example.test",), "postmaster@example.test"),
                              MailauthConfig(), "mx.bench.example",
                              verify_dkim=functools.partial(verify_message, lookup=resolver, timeout=2.0),
                              verify_arc=functools.partial(verify_arc, lookup=resolver, timeout=2.0))
        await measure(check, message(pem), 20)  # warm the resolver's cache, as a running server has it
        asked = len(dns.queries)
        for label, data in (("SPF at MAIL only", None), ("whole check, DKIM-signed", message(pem)),
                            ("whole check, unsigned", message(None))):
            cpu, wall, dmarc = await measure(check, data, n)
            print(f"{label:28} {cpu:7.0f} µs CPU/message  {wall:7.0f} µs wall  dmarc={dmarc}")
        print(f"DNS queries during the {3 * n} measured messages (the rest came from the cache): "
              f"{len(dns.queries) - asked}")
        store.close()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=2000)
    args = ap.parse_args()
    logging.disable(logging.INFO)  # one event=mailauth line per message would measure the log
    asyncio.run(main(args.messages))
