"""The harness itself: the TOML it writes is the config it describes, and a server that cannot start fails fast."""

from __future__ import annotations

import socket
import tomllib

import pytest

from tests.harness import BASE_CONFIG, ServerConfig, toml_text
from yuubin.config import load


def test_toml_text_round_trips_through_tomllib():
    raw = {
        "hostname": "mx.test.example", "data_dir": "data", "flag": True, "ratio": 0.5, "count": 3,
        "quoted": 'a "quoted" \\ string\twith ünïcode', "empty": [],
        "limits": {"idle_timeout": "10s", "nested": {"deep": 1}},
        "listener": [{"kind": "mx", "address": "127.0.0.1:0", "allow": ["JP", "10.0.0.0/8"]},
                     {"kind": "submission", "address": "[::1]:0"}],
        "odd key": {"a.b": "c"},
    }
    assert tomllib.loads(toml_text(raw)) == raw


def test_overrides_merge_over_the_base_and_none_removes(tmp_path):
    sc = ServerConfig(tmp_path, dns_port=5353, limits={"shutdown_grace": "1s"}, dnsbl=None, hostname="h.test")
    assert sc.raw["limits"] == {"idle_timeout": "10s", "shutdown_grace": "1s"}  # merged table
    assert "dnsbl" not in sc.raw and sc.raw["hostname"] == "h.test"
    assert sc.raw["dns"] == {"nameservers": ["127.0.0.1"], "port": 5353, "timeout": 0.5}
    assert "tls" not in sc.raw  # no TLS files given
    assert BASE_CONFIG["limits"] == {"idle_timeout": "10s", "shutdown_grace": "5s"}  # the base is not changed
    assert ServerConfig(tmp_path, tls_files=(tmp_path / "c", tmp_path / "k"), tls={}).raw["tls"] == {}


def test_the_written_file_is_the_config_it_describes(tmp_path, tls_files):
    sc = ServerConfig(tmp_path / "conf", tls_files=tls_files, data_dir="rel",
                      listener=[{"kind": "mx", "address": "127.0.0.1:0"},
                                {"kind": "submission", "address": "127.0.0.1:0"}])
    from_file = load(sc.write("x.toml"))
    assert sc.path == tmp_path / "conf" / "x.toml"
    assert from_file == sc.load()
    assert from_file.data_dir == tmp_path / "conf" / "rel"  # relative to the file
    assert [lc.kind for lc in from_file.listeners] == ["mx", "submission"]


def test_accounts_and_aliases_land_in_state_db(tmp_path):
    from yuubin.auth.passwords import verify_password
    from yuubin.store import Store

    sc = ServerConfig(tmp_path).add_accounts({"carol@example.test": "a long enough passphrase"},
                                             {"team@example.test": ["carol@example.test"]}, cached=True)
    store = Store(sc.load().state_db)
    try:
        assert verify_password(store.account("carol@example.test").password_hash, "a long enough passphrase")
        assert store.account("alice@example.test") is None
        assert store.alias_targets("team@example.test") == ["carol@example.test"]
    finally:
        store.close()


def test_serve_process_that_cannot_listen_fails_with_its_log(make_config, serve_process):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        config = make_config(listener=[{"kind": "mx", "address": f"127.0.0.1:{busy.getsockname()[1]}"}])
        with pytest.raises(AssertionError, match="exited with"):
            serve_process(config)
