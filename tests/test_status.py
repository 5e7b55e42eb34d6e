"""`yuubin status`, /metrics and JSON logs from a real `yuubin serve` under a bounded load.

The numbers must match what the test did: messages accepted, commands refused by stage and check,
DNSBL hits by zone, sessions open now — with one worker and with two (whose tallies the primary
adds up).
"""

from __future__ import annotations

import json
import re
import smtplib
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import ServeProcess, free_port, run_yuubin
from tests.smtpclient import RawSMTP

ALICE = "alice@example.test"


@pytest.fixture(autouse=True)
def _hash_each_password_once(cached_hashes):
    """No password is checked here."""


def _send(port: int, source: str, rcpts: list[str]) -> dict:
    with smtplib.SMTP("127.0.0.1", port, source_address=(source, 0), timeout=10) as s:
        try:
            return s.sendmail("sender@remote.example", rcpts, b"Subject: t\r\n\r\nbody\r\n")
        except smtplib.SMTPRecipientsRefused as e:
            return e.recipients


def _status(path) -> dict:
    r = run_yuubin(["status", "--json"], config=path)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _metrics(port: int) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _wait(predicate, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.2)


@pytest.mark.parametrize("workers", [1, 2])
def test_status_and_metrics_count_what_happened(make_config, serve_process, dns_server, workers):
    dns_server.add("77.0.1.127.zen.dnsbl.test", "A", "127.0.0.2")
    metrics_port = free_port()
    sc = make_config(server={"workers": workers}, metrics={"address": f"127.0.0.1:{metrics_port}"})
    sc.write()
    sc.add_accounts(cached=True)
    srv = serve_process(sc)
    port = srv.port("mx")
    sent = 6
    for i in range(sent):
        assert _send(port, f"127.1.0.{10 + i}", [ALICE]) == {}
    refused = _send(port, "127.1.0.30", ["nobody@example.test", "x@remote.example"])
    assert set(refused) == {"nobody@example.test", "x@remote.example"}
    with RawSMTP(port, source="127.1.0.77") as c:  # listed: refused at connect
        assert c.reply()[0] == 554
    srv.wait_delivered(ALICE, sent)
    with RawSMTP(port, source="127.1.0.40") as idle:  # one session open while we ask
        assert idle.reply()[0] == 220
        want_sessions = 1

        def settled():
            doc = _status(sc.path)
            hour = doc["last_hour"]
            ok = (hour["accepted"] == sent and doc["sessions"].get("mx") == want_sessions
                  and hour["rejected"].get("rcpt/relay") == 1)
            return doc if ok else None

        doc = _wait(settled, 15) or _status(sc.path)
        assert doc["last_hour"]["accepted"] == sent, doc
        assert doc["last_hour"]["rejected"] == {"rcpt/recipient": 1, "rcpt/relay": 1, "connect/dnsbl": 1}
        assert doc["workers"] == workers
        assert [(lc["kind"], lc["sessions"]) for lc in doc["listeners"]] == [("mx", 1)]
        assert [h["client"] for h in doc["dnsbl_hits"]] == ["127.1.0.77"]
        assert doc["queue"] == {} and doc["lockouts"] == [] and doc["suspended"] == []
        assert doc["certificate"]["days_left"] > 0

        m = _metrics(metrics_port)
        assert m[("yuubin_messages_accepted_total", ())] == sent
        assert m[("yuubin_rejections_total", (("check", "relay"), ("stage", "rcpt")))] == 1
        assert m[("yuubin_dnsbl_hits_total", (("zone", "zen.dnsbl.test"),))] == 1
        assert m[("yuubin_sessions", (("listener", "mx"),))] == 1
        assert m[("yuubin_deliveries_total", (("result", "delivered"),))] == sent
        assert m[("yuubin_delivery_seconds_count", ())] == sent
        assert m[("yuubin_connections_total", (("listener", "mx"),))] == sent + 1 + 1 + 1  # + refused + listed + idle
        assert m[("yuubin_queue_entries", (("state", "held"),))] == 0
        # Every metric the sample Grafana dashboard graphs is one the server serves.
        dashboard = (Path(__file__).resolve().parent.parent / "contrib" / "grafana-dashboard.json").read_text()
        graphed = set(re.findall(r"yuubin_[a-z_]+", dashboard)) - {"yuubin_overview"}
        served = {name for name, _labels in m}
        assert graphed and graphed <= served, graphed - served

    text = run_yuubin(["status"], config=sc.path)
    assert text.returncode == 0 and "messages accepted" in text.stdout and "rcpt/relay" in text.stdout


def test_status_without_a_server_says_so(make_config):
    sc = make_config()
    path = sc.write()
    r = run_yuubin(["status"], config=path)
    assert r.returncode == 1 and "no server running" in r.stderr


def test_control_socket_is_private_and_answers_garbage_politely(make_config, serve_process):
    sc = make_config()
    sc.write()
    srv = serve_process(sc)
    sock_path = srv.config.data_dir / "run" / "control.sock"
    assert sock_path.stat().st_mode & 0o077 == 0
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(str(sock_path))
        s.sendall(b"\x00\xffrm -rf /\n")
        answer = json.loads(s.makefile("rb").read())
    assert "unknown request" in answer["error"]
    assert _status(sc.path)["version"]


def test_metrics_404_and_json_logs(make_config):
    metrics_port = free_port()
    sc = make_config(metrics={"address": f"127.0.0.1:{metrics_port}"}, log={"format": "json"})
    sc.write()
    srv = ServeProcess(sc)  # started by hand: its listening lines are JSON, not what start() reads
    try:
        _json_logs_and_404(srv, metrics_port)
    finally:
        srv.close()


def _json_logs_and_404(srv: ServeProcess, metrics_port: int) -> None:
    def listening():
        for line in srv.log_text().splitlines():
            if line.startswith("{") and json.loads(line).get("event") == "listening":
                return int(json.loads(line)["address"].rpartition(":")[2])
        assert srv.running(), srv.log_text()
        return None

    port = _wait(listening, 20)
    assert port, srv.log_text()
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/", timeout=5)
    assert e.value.code == 404
    with RawSMTP(port, source="127.1.0.50") as c:
        c.reply()
        c.cmd("QUIT")
    srv.stop()
    lines = [json.loads(line) for line in srv.log_text().splitlines() if line.startswith("{")]
    events = {d.get("event") for d in lines}
    assert {"starting", "connect", "disconnect", "stopped"} <= events
    connect = next(d for d in lines if d.get("event") == "connect")
    assert connect["client"] == "127.1.0.50" and connect["listener"] == "mx" and connect["time"].endswith("Z")
