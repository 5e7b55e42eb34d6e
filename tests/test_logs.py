"""Log lines: key=value in UTC, batched, warnings written at once."""

import io
import logging
import time

from yuubin.logs import BatchedLineHandler, KeyValueFormatter


def _logger(stream, interval):
    handler = BatchedLineHandler(stream, interval=interval)
    handler.setFormatter(KeyValueFormatter())
    logger = logging.getLogger(f"yuubin.test.{id(stream)}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    return logger, handler


def test_info_lines_are_batched_and_warnings_go_out_at_once():
    out = io.StringIO()
    logger, handler = _logger(out, interval=60)  # the writer thread will not fire during the test
    try:
        logger.info("event=connect session=%s", "1")
        assert out.getvalue() == ""  # still in the batch
        logger.warning("event=dnsbl_error zone=%s", "zen.example")
        lines = out.getvalue().splitlines()
        assert [ln.split(" ", 1)[1] for ln in lines] == [
            f"level=INFO logger={logger.name} event=connect session=1",
            f"level=WARNING logger={logger.name} event=dnsbl_error zone=zen.example",
        ]
        assert lines[0][:4].isdigit() and lines[0].split(" ", 1)[0].endswith("Z")  # ISO time in UTC
    finally:
        handler.close()


def test_the_writer_thread_flushes_on_its_interval():
    out = io.StringIO()
    logger, handler = _logger(out, interval=0.02)
    try:
        logger.info("event=accepted id=%s", "abc")
        deadline = time.monotonic() + 2
        while "event=accepted id=abc" not in out.getvalue() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert "event=accepted id=abc" in out.getvalue()
    finally:
        handler.close()


def test_a_traceback_stays_on_one_line():
    out = io.StringIO()
    logger, handler = _logger(out, interval=60)
    try:
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("event=session_error session=%s", "2")
        assert out.getvalue().count("\n") == 1 and "ValueError: boom" in out.getvalue()
    finally:
        handler.close()


def test_no_own_timestamp_when_stderr_is_the_journal(tmp_path, monkeypatch):
    """Under systemd, stderr is the journal ($JOURNAL_STREAM = its device:inode), which stamps
    every line itself: a second timestamp would only be noise. Any other stderr keeps ours."""
    import json as jsonlib
    import logging
    import os
    import sys

    from yuubin import logs

    out = tmp_path / "stderr"
    with open(out, "w") as f:
        st = os.fstat(f.fileno())
        monkeypatch.setattr(sys, "stderr", f)
        for journal, fmt in ((True, "text"), (True, "json"), (False, "text")):
            monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}" if journal else "1:2")
            logs.setup("info", fmt=fmt)
            logging.getLogger("yuubin.test").info("event=probe journal=%s", journal)
            logs.shutdown()
    lines = out.read_text().splitlines()
    assert lines[0].startswith("level=INFO logger=yuubin.test event=probe")
    assert "time" not in jsonlib.loads(lines[1]) and jsonlib.loads(lines[1])["event"] == "probe"
    assert lines[2].endswith("event=probe journal=False") and lines[2][:4].isdigit()
