"""Never lose a message: kill -9 a real `yuubin serve` at random points during a stream of mail.

Every message that got 250 must arrive (local Maildir or the remote MX sink) after restarts;
duplicates are allowed (a kill between the remote's 250 and our rewrite sends it again).
"""

from __future__ import annotations

import contextlib
import os
import random
import smtplib
import subprocess
import threading
import time

import pytest

from tests.harness import free_port
from tests.smtpsink import SmtpSink

KILLS = 5
ALICE = "alice@example.test"
REMOTE = "carol@remote.test"


@pytest.mark.slow
def test_kill_9_during_a_stream_of_mail_loses_nothing(make_config, dns_server, serve_process):
    rng = random.Random(os.environ.get("YUUBIN_CRASH_SEED", "4"))
    mx_port = free_port("127.1.0.1")
    listen_port = free_port("127.0.0.1")  # fixed: the client keeps sending to it across restarts
    dns_server.add("remote.test", "MX", "10 mx.remote.test.")
    dns_server.add("mx.remote.test", "A", "127.1.0.1")
    config = make_config(
        listener=[{"kind": "mx", "address": f"127.0.0.1:{listen_port}"}],
        limits={"shutdown_grace": "2s"},
        outbound={"port": mx_port, "retry_first": "0.2s", "retry_max": "0.5s", "queue_scan": "0.5s",
                  "connect_timeout": "2s", "command_timeout": "5s"},
    ).add_accounts({ALICE: "crash test password 1"}, cached=True)

    accepted: dict[str, list[str]] = {}
    stop = threading.Event()

    def stream() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            token = f"crash-{n}"
            rcpts = [[ALICE], [REMOTE], [ALICE, REMOTE]][n % 3]
            body = f"From: <{ALICE}>\r\nSubject: {token}\r\n\r\nbody of {token}\r\n.dot line\r\n"
            try:
                with smtplib.SMTP("127.0.0.1", listen_port, timeout=5) as c:
                    c.sendmail(ALICE, rcpts, body)
            except (OSError, smtplib.SMTPException):
                time.sleep(0.02)  # down or killed mid-transaction: not acknowledged, not counted
                continue
            accepted[token] = rcpts

    with SmtpSink(host="127.1.0.1", port=mx_port) as sink:
        proc = serve_process(config)
        t0 = time.monotonic()
        client = threading.Thread(target=stream, daemon=True)
        client.start()
        try:
            for _ in range(KILLS):
                time.sleep(rng.uniform(0.3, 1.5))
                proc.kill()
                proc = serve_process(config)
            time.sleep(0.5)
            stop.set()
            client.join(10)
            assert len(accepted) >= 20, f"only {len(accepted)} messages accepted: the test did not stress anything"

            def missing() -> list[str]:
                local = b"".join(proc.delivered(ALICE))
                with sink.lock:
                    remote = b"".join(m.data for m in sink.messages)
                out = []
                for token, rcpts in accepted.items():
                    needle = f"Subject: {token}\r\n".encode()
                    if (ALICE in rcpts and needle not in local) or (REMOTE in rcpts and needle not in remote):
                        out.append(token)
                return out

            deadline = time.monotonic() + 25
            while missing() and time.monotonic() < deadline:
                time.sleep(0.2)
            lost = missing()
            assert not lost, f"{len(lost)} of {len(accepted)} acknowledged messages lost: {lost[:10]}"
            print(f"crash test: {len(accepted)} acknowledged, {KILLS} kills, {len(sink.messages)} remote copies, "
                  f"{len(list((proc.config.spool_dir / 'corrupt').iterdir()))} set aside as torn")
            assert sink.bare_line_endings == 0
            assert b"\r\n.dot line\r\n" in sink.messages[0].data
        finally:
            stop.set()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.stop(10)
    assert time.monotonic() - t0 < 60
