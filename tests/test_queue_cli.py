"""`yuubin queue` as an admin meets it: columns that line up, counts in English, times in UTC, a
unique start of an ID instead of all 23 characters, and `flush` that says when no server runs.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.harness import run_yuubin
from yuubin.config import load
from yuubin.durable import GroupCommitter
from yuubin.queue.control import QueueControl
from yuubin.queue.signal import RUNNING_LOCK, RunningLock, scheduler_running
from yuubin.queue.spool import Envelope, RemoteRecipient, Spool

IDS = ["18f3a6c1d2e4b5a60d2c001", "18f3a6c1d2e4b5a60d2c002", "27b0c4d5e6f708192a3b003"]


def put(spool_root: Path, qid: str, *, error: str = "", sender: str = "alice@example.test",
        received: float = 1700000000.0) -> None:
    spool = Spool(spool_root, GroupCommitter(workers=1))
    rcpt = RemoteRecipient("carol@remote.test", tries=1 if error else 0, error=error, next=received + 3600)
    env = Envelope(id=qid, sender=sender, mail_params={}, local=[], remote=[rcpt], received=received,
                   client="127.0.0.1", helo="pc", listener="submission")
    asyncio.run(spool.store(env, b"Subject: queued\r\n\r\nbody\r\n"))
    spool.committer.shutdown()


@pytest.fixture
def config(make_config) -> Path:
    return make_config(dns=None, dnsbl={"zones": []}).write()


@pytest.fixture
def spool_root(config: Path) -> Path:
    return load(config).spool_dir


def usage_error(p: subprocess.CompletedProcess, status: int = 2) -> str:
    assert p.returncode == status, (p.returncode, p.stdout, p.stderr)
    assert "Traceback" not in p.stderr
    [line] = p.stderr.strip().splitlines()
    return line


# ---- list -------------------------------------------------------------------------------------

def test_queue_list_columns_line_up_and_count_in_english(spool_root: Path):
    put(spool_root, IDS[0], error="451 4.7.1 greylisted, try again later")
    ctl = QueueControl(spool_root)
    try:
        one = ctl.list_text(as_json=False).splitlines()
        put(spool_root, IDS[2], sender="a.much.longer.sender.address@example.test")
        two = ctl.list_text(as_json=False).splitlines()
    finally:
        ctl.close()
    assert one[-1] == "-- 1 entry" and two[-1] == "-- 2 entries"
    header, first, error, second = two[:4]
    ages = [re.match(r"\S+ +\S+", row).end() for row in (first, second)]  # right-aligned
    assert ages == [header.index("AGE") + 3] * 2, two
    assert first.index("deferred") == second.index("queued") == header.index("STATE")
    assert first.index("2023-") == second.index("2023-") == header.index("NEXT ATTEMPT")
    assert first.index("<alice@") == second.index("<a.much") == header.index("SENDER")
    assert error.index("451") == header.index("SENDER")  # the last error under the sender
    # the next attempt in UTC, like the logs: received + 1h
    assert "2023-11-14T23:13:20Z" in first, first


# ---- an ID or its unique start ----------------------------------------------------------------

def test_show_hold_release_delete_take_a_unique_start_of_an_id(config: Path, spool_root: Path):
    for qid in IDS:
        put(spool_root, qid)
    p = run_yuubin(["queue", "show", "27b"], config=config)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith(f"# entry {IDS[2]} (queued), received 2023-11-14T22:13:20Z")
    p = run_yuubin(["queue", "hold", "18f3a6c1d2e4b5a60d2c002"], config=config)  # a whole id still works
    assert p.returncode == 0 and f"hold: 1 entry ({IDS[1]})" in p.stdout, p.stderr
    p = run_yuubin(["queue", "release", "18f3a6c1d2e4b5a60d2c00"], config=config)  # two ids start so
    line = usage_error(p)
    assert line.startswith("yuubin: error: ID: 18f3a6c1d2e4b5a60d2c00 is the start of 2 queue ids") and \
        "give more of it" in line, line
    p = run_yuubin(["queue", "delete", "18f3a6c1d2e4b5a60d2c001"[:-1] + "1"], config=config)
    assert p.returncode == 0 and f"deleted 1 entry ({IDS[0]})" in p.stdout, p.stderr
    assert "ID: no queue entry 9" in usage_error(run_yuubin(["queue", "show", "9"], config=config))
    assert "ID: no queue entry ../state.db" in usage_error(run_yuubin(["queue", "show", "../state.db"],
                                                                      config=config))
    p = run_yuubin(["queue", "delete", "2"], config=config)
    assert p.returncode == 0 and f"deleted 1 entry ({IDS[2]})" in p.stdout, p.stderr
    assert sorted(q.name for q in (spool_root / "queue").iterdir()) == [IDS[1]]


# ---- flush needs the running server -----------------------------------------------------------

def test_the_running_lock_is_what_tells_a_running_scheduler(tmp_path: Path):
    assert not scheduler_running(tmp_path)  # no server has run here
    lock = RunningLock(tmp_path)
    assert scheduler_running(tmp_path)
    other = RunningLock(tmp_path)  # a second server on the same spool does not wait
    lock.close()
    assert scheduler_running(tmp_path)
    other.close()
    assert not scheduler_running(tmp_path)  # the file stays behind, the lock does not
    assert (tmp_path / RUNNING_LOCK).exists()


def _wait_running(spool_root: Path, running: bool, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while scheduler_running(spool_root) != running:
        assert time.monotonic() < deadline, f"scheduler_running never became {running}"
        time.sleep(0.02)


@pytest.mark.slow
def test_queue_flush_says_when_no_server_runs(make_config, serve_process):
    served = make_config()
    config = served.write()
    spool_root = load(config).spool_dir
    # Received now: an entry past the queue lifetime would be bounced and gone by the flush.
    put(spool_root, IDS[0], received=time.time())
    not_running = "no server is running with the queue in"
    assert not_running in usage_error(run_yuubin(["queue", "flush"], config=config), status=1)

    srv = serve_process(served)
    _wait_running(spool_root, True)  # the scheduler starts just after the listeners
    p = run_yuubin(["queue", "flush", "18f"], config=config)
    assert p.returncode == 0 and f"flush requested for {IDS[0]}" in p.stdout, p.stderr
    assert srv.stop() == 0
    assert not_running in usage_error(run_yuubin(["queue", "flush"], config=config), status=1)

    srv = serve_process(served)  # a crash leaves its lock file, but no lock: not taken for a running server
    _wait_running(spool_root, True)
    srv.kill()
    assert (spool_root / RUNNING_LOCK).exists()
    assert not_running in usage_error(run_yuubin(["queue", "flush"], config=config), status=1)
