"""config.from_dict on its own: which listener addresses can be bound side by side, and the
errors that name a typo or a network with host bits (the CLI tests show the same over `config check`)."""

from __future__ import annotations

from typing import Any

import pytest

from yuubin.config import ConfigError, from_dict

BASE: dict[str, Any] = {"hostname": "mx.example.test", "domains": {"local": ["example.test"]}}


def _listeners(*addresses: str) -> dict[str, Any]:
    return {**BASE, "listener": [{"kind": "mx", "address": a} for a in addresses]}


@pytest.mark.parametrize("addresses", [
    ("0.0.0.0:25", "[::]:25"),  # IPv4 and IPv6 wildcards are separate sockets (IPV6_V6ONLY)
    ("127.0.0.1:25", "127.0.0.2:25"),
    ("0.0.0.0:25", "127.0.0.1:2525"),
    ("127.0.0.1:0", "127.0.0.1:0", "0.0.0.0:0"),  # port 0: each gets its own free port
    ("[::1]:25", "127.0.0.1:25"),
])
def test_listeners_that_can_be_bound_together(addresses):
    assert len(from_dict(_listeners(*addresses)).listeners) == len(addresses)


@pytest.mark.parametrize(("addresses", "names"), [
    (("127.0.0.1:25", "127.0.0.1:25"), ["listener[1].address", "used twice", "listener[0]"]),
    (("127.0.0.9:25", "0.0.0.0:25"), ["listener[1].address", "listener[0]", "every IPv4 address"]),
    (("[::]:587", "[2001:db8::1]:587"), ["listener[1].address", "listener[0]", "every IPv6 address"]),
    (("localhost:25", "[::1]:25"), ["listener[1].address", "listener[0]", "same address"]),
])
def test_listeners_that_cannot(addresses, names):
    with pytest.raises(ConfigError) as e:
        from_dict(_listeners(*addresses))
    for name in names:
        assert name in str(e.value), (name, str(e.value))


def test_unknown_keys_suggest_the_nearest_known_one():
    with pytest.raises(ConfigError, match=r"^limits\.max_conections: unknown key \(did you mean max_connections\?\)$"):
        from_dict({**BASE, "limits": {"max_conections": 5}})
    with pytest.raises(ConfigError, match=r"^domains\.locale: unknown key \(did you mean local\?\)$"):
        from_dict({**BASE, "domains": {"locale": ["example.test"]}})
    with pytest.raises(ConfigError, match=r"^frobnicate: unknown key$"):  # nothing near: no guess
        from_dict({**BASE, "frobnicate": 1})


def test_host_bits_are_refused_and_a_single_host_is_a_network():
    with pytest.raises(ConfigError, match=r'^network\.trusted\[1\]: .*host bits.*"192\.0\.2\.0/24".*"192\.0\.2\.7/32"'):
        from_dict({**BASE, "network": {"trusted": ["192.0.2.0/24", "192.0.2.7/24"]}})
    cfg = from_dict({**BASE, "network": {"trusted": ["192.0.2.7", "192.0.2.8/32", "2001:db8::/32"]}})
    assert [str(n) for n in cfg.trusted] == ["192.0.2.7/32", "192.0.2.8/32", "2001:db8::/32"]


def test_mailauth_defaults_and_values():
    cfg = from_dict(dict(BASE))
    m = cfg.mailauth
    assert (m.dmarc_reject, m.dmarc_quarantine, m.spf_temperror, m.trusted_arc_sealers, m.report_address,
            m.check_timeout) == ("reject", "quarantine", "deliver", (), "dmarc-reports", 20.0)
    cfg = from_dict({**BASE, "mailauth": {"dmarc_reject": "Quarantine", "spf_temperror": "defer",
                                          "trusted_arc_sealers": ["Lists.Example.ORG."], "check_timeout": "5s"}})
    m = cfg.mailauth
    assert (m.dmarc_reject, m.spf_temperror, m.trusted_arc_sealers, m.check_timeout) == (
        "quarantine", "defer", ("lists.example.org",), 5.0)


@pytest.mark.parametrize(("table", "message"), [
    ({"dmarc_reject": "bounce"}, "mailauth.dmarc_reject: expected 'reject' or 'quarantine' or 'deliver'"),
    ({"dmarc_quarantine": "reject"}, "mailauth.dmarc_quarantine: expected 'quarantine' or 'deliver'"),
    ({"spf_temperror": "reject"}, "mailauth.spf_temperror: expected 'deliver' or 'defer'"),
    ({"trusted_arc_sealers": ["not a domain"]}, "mailauth.trusted_arc_sealers[0]:"),
    ({"report_address": "reports@example.test"}, "mailauth.report_address: expected a local part"),
    ({"spf_timeout": "5s"}, "mailauth.spf_timeout: unknown key"),
])
def test_mailauth_mistakes_are_named(table, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        from_dict({**BASE, "mailauth": table})
