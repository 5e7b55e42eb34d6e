"""`yuubin dkim keygen/list`, `yuubin dns records` and `yuubin check` (against the test DNS server)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from tests.dnsserver import TestDNSServer
from yuubin import cli
from yuubin.dns import Resolver
from yuubin.mailauth import dkimkeys
from yuubin.mailauth.dnsrecords import Record, spf_authorises, zone_line

IP = "192.0.2.7"
HOST = "mx.test.example"  # BASE_CONFIG's hostname


@pytest.fixture
def config(make_config) -> Path:
    return make_config(server={"public_ip": IP}).write()


def run(capsys, *args: str) -> tuple[int, str, str]:
    status = cli.main(list(args))
    out = capsys.readouterr()
    return status, out.out, out.err


def test_keygen_prints_records_and_refuses_to_overwrite(config: Path, capsys) -> None:
    status, out, _ = run(capsys, "dkim", "keygen", "example.test", "--selector", "s1", "-c", str(config))
    assert status == 0
    assert "s1-rsa._domainkey.example.test.\t3600\tIN\tTXT\t\"v=DKIM1; k=rsa; p=MIIB" in out
    rsa_line = next(line for line in out.splitlines() if line.startswith("s1-rsa._domainkey"))
    assert rsa_line.count('"') == 4  # 2048-bit key: two strings of at most 255 bytes
    assert "s1-ed25519._domainkey.example.test.\t3600\tIN\tTXT\t\"v=DKIM1; k=ed25519; p=" in out
    assert "signs with it from its next start" in out
    status, _, err = run(capsys, "dkim", "keygen", "example.test", "--selector", "s1", "-c", str(config))
    assert status == 2 and "never overwritten" in err
    status, _, err = run(capsys, "dkim", "keygen", "elsewhere.test", "-c", str(config))
    assert status == 2 and "not one of domains.local" in err
    status, _, err = run(capsys, "dkim", "keygen", "example.test", "--selector", "no way", "-c", str(config))
    assert status == 2 and "--selector" in err


def test_default_set_name_and_list(config: Path, capsys) -> None:
    assert run(capsys, "dkim", "keygen", "example.test", "-c", str(config))[0] == 0
    assert run(capsys, "dkim", "keygen", "example.test", "-c", str(config))[0] == 0
    status, out, _ = run(capsys, "dkim", "list", "-c", str(config))
    assert status == 0
    lines = out.splitlines()
    import datetime
    year = datetime.datetime.now(datetime.UTC).year
    mine = [line.split("\t") for line in lines if line.startswith("example.test")]
    assert [(f[1], f[2]) for f in mine] == [(f"y{year}a", "not signing"), (f"y{year}b", "signing")]
    assert any(line.startswith("other.test\t-\tno keys") for line in lines)


def test_dns_records(config: Path, capsys) -> None:
    run(capsys, "dkim", "keygen", "example.test", "--selector", "s1", "-c", str(config))
    status, out, _ = run(capsys, "dns", "records", "example.test", "-c", str(config))
    assert status == 0
    assert f"example.test.\t3600\tIN\tMX\t10 {HOST}." in out
    assert 'example.test.\t3600\tIN\tTXT\t"v=spf1 mx -all"' in out
    assert "s1-rsa._domainkey.example.test." in out and "s1-ed25519._domainkey.example.test." in out
    assert '_dmarc.example.test.\t3600\tIN\tTXT\t"v=DMARC1; p=quarantine; rua=mailto:dmarc-reports@example.test"' in out
    assert f"{HOST}.\t3600\tIN\tA\t{IP}" in out
    assert f"7.2.0.192.in-addr.arpa.\t3600\tIN\tPTR\t{HOST}." in out
    status, out, _ = run(capsys, "dns", "records", "--ip", "2001:db8::7", "-c", str(config))
    assert "; other.test" in out and "no DKIM keys for other.test" in out
    assert f"{HOST}.\t3600\tIN\tAAAA\t2001:db8::7" in out
    assert f"{ipaddress.ip_address('2001:db8::7').reverse_pointer}.\t3600\tIN\tPTR\t{HOST}." in out
    assert run(capsys, "dns", "records", "--ip", "nope", "-c", str(config))[0] == 2


def test_zone_line_escapes_and_splits() -> None:
    line = zone_line(Record("a.test", "TXT", 'x"y' + "z" * 300))
    assert line.startswith('a.test.\t3600\tIN\tTXT\t"x\\"y') and line.count('" "') == 1


def publish_all(dns_server: TestDNSServer, data_dir: Path) -> None:
    dns_server.add("example.test", "MX", f"10 {HOST}.")
    dns_server.add("example.test", "TXT", "v=spf1 mx -all")
    dns_server.add("_dmarc.example.test", "TXT", "v=DMARC1; p=quarantine; rua=mailto:dmarc-reports@example.test")
    dns_server.add(HOST, "A", IP)
    dns_server.add("7.2.0.192.in-addr.arpa", "PTR", f"{HOST}.")
    for s in dkimkeys.key_sets(data_dir, "example.test"):
        for k in s.keys:
            dns_server.add(k.dns_name, "TXT", k.txt_record())


def test_check_all_good_then_each_problem(config: Path, make_config, dns_server: TestDNSServer, capsys) -> None:
    run(capsys, "dkim", "keygen", "example.test", "--selector", "s1", "-c", str(config))
    data_dir = config.parent / "data"
    publish_all(dns_server, data_dir)
    status, out, _ = run(capsys, "check", "example.test", "-c", str(config))
    assert status == 0, out
    for what in ("MX", "SPF", "DKIM", "DMARC", "A", "PTR", "DNSBL"):
        assert any(line.split()[:2] == ["ok", what] for line in out.splitlines()), (what, out)
    assert "all records are as they should be" in out
    assert ("7.2.0.192.zen.dnsbl.test", "A") in dns_server.queries

    dns_server.clear()
    dns_server.add("example.test", "MX", "10 mail.elsewhere.test.")
    dns_server.add("example.test", "TXT", "v=spf1 ip4:198.51.100.0/24 -all")
    dns_server.add(HOST, "A", "192.0.2.99")
    dns_server.add("7.2.0.192.in-addr.arpa", "PTR", "dsl-7.isp.test.")
    dns_server.add("s1-rsa._domainkey.example.test", "TXT", "v=DKIM1; k=rsa; p=MIIBother")
    dns_server.add("7.2.0.192.zen.dnsbl.test", "A", "127.0.0.2")
    status, out, _ = run(capsys, "check", "example.test", "-c", str(config))
    assert status == 1
    expect = {
        ("WRONG", "MX"): "points at mail.elsewhere.test",
        ("WRONG", "SPF"): "does not let 192.0.2.7 send",
        ("WRONG", "DKIM"): "p= differs",
        ("MISSING", "DKIM"): "s1-ed25519._domainkey.example.test has no TXT",
        ("MISSING", "DMARC"): "v=DMARC1; p=quarantine",
        ("WRONG", "A"): "192.0.2.99, not 192.0.2.7",
        ("WRONG", "PTR"): "dsl-7.isp.test",
        ("WRONG", "DNSBL"): "LISTED on zen.dnsbl.test",
    }
    for (status_word, what), words in expect.items():
        assert any(line.split()[:2] == [status_word, what] and words in line for line in out.splitlines()), \
            (status_word, what, out)
    assert "8 problems found" in out


def test_check_without_ip_and_with_dns_down(make_config, dns_server: TestDNSServer, capsys) -> None:
    config = make_config().write()
    dns_server.set_behaviour("example.test", "servfail")
    dns_server.set_behaviour("_dmarc.example.test", "servfail")
    status, out, _ = run(capsys, "check", "example.test", "-c", str(config))
    assert "no public IP known" in out
    assert "MISSING  DKIM" in out  # no keys made yet
    assert any(line.split()[:2] == ["unknown", "MX"] for line in out.splitlines())
    assert status == 1  # the missing keys


async def test_spf_authorisation_walk(dns_server: TestDNSServer, resolver: Resolver) -> None:
    ip = ipaddress.ip_address(IP)
    dns_server.add("a.test", "TXT", "v=spf1 include:_spf.b.test ~all")
    dns_server.add("_spf.b.test", "TXT", "v=spf1 ip4:192.0.2.0/28 -all")
    dns_server.add("c.test", "TXT", "v=spf1 redirect=a.test")
    dns_server.add("d.test", "TXT", "v=spf1 a:host.d.test/24 -all")
    dns_server.add("host.d.test", "A", "192.0.2.200")
    dns_server.add("e.test", "TXT", "v=spf1 -ip4:192.0.2.7 +all")
    dns_server.add("f.test", "TXT", "v=spf1 exists:%{i}.x.test -all")
    dns_server.add("g.test", "TXT", "v=spf1 include:g.test -all")  # a loop: the lookup limit ends it
    assert await spf_authorises(resolver, "a.test", ip) is True
    assert await spf_authorises(resolver, "c.test", ip) is True
    assert await spf_authorises(resolver, "d.test", ip) is True
    assert await spf_authorises(resolver, "d.test", ipaddress.ip_address("198.51.100.1")) is False
    assert await spf_authorises(resolver, "e.test", ip) is False
    assert await spf_authorises(resolver, "f.test", ip) is None
    assert await spf_authorises(resolver, "g.test", ip) is None
    assert await spf_authorises(resolver, "nothing.test", ip) is False


def test_dnsbl_names_match_the_mx_check() -> None:
    from yuubin.mailauth.dnsrecords import reverse_name
    from yuubin.policy import dnsbl
    for ip in ("192.0.2.7", "2001:db8::7"):
        assert reverse_name(ip, "zen.test.") == dnsbl.reverse_name(ip, "zen.test")
    assert reverse_name("192.0.2.7", "zen.test") == "7.2.0.192.zen.test"


def test_config_check_reads_the_signing_keys(config: Path, capsys) -> None:
    run(capsys, "dkim", "keygen", "example.test", "--selector", "s1", "-c", str(config))
    status, out, _ = run(capsys, "config", "check", "-c", str(config))
    assert status == 0
    assert "[dkim]" in out and "sign = true" in out and 'public_ip = ["192.0.2.7"]' in out
    key = config.parent / "data" / "dkim" / "example.test" / "s1-rsa.key"
    key.write_bytes(b"-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    status, _, err = run(capsys, "config", "check", "-c", str(config))
    assert status == 2 and "dkim: cannot read a signing key" in err, err


def test_config_keys(make_config) -> None:
    from yuubin.config import ConfigError
    cfg = make_config(dkim={"selectors": ["y2026a"], "sign": False, "max_signatures": 3},
                      server={"public_ip": ["192.0.2.7", "2001:DB8::7"]}).load()
    assert cfg.dkim.selectors == ("y2026a",) and not cfg.dkim.sign and cfg.dkim.max_signatures == 3
    assert cfg.public_ips == ("192.0.2.7", "2001:db8::7")
    for bad, words in (({"dkim": {"selectors": ["Bad Name"]}}, "dkim.selectors[0]"),
                       ({"dkim": {"arc_max_sets": 51}}, "dkim.arc_max_sets"),
                       ({"server": {"public_ip": "300.1.1.1"}}, "server.public_ip"),
                       ({"dkim": {"colour": "red"}}, "dkim.colour")):
        with pytest.raises(ConfigError, match=words.replace("[", r"\[").replace("]", r"\]")):
            make_config(**bad).load()
