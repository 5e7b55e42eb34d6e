"""Envelope address parsing (RFC 5321 4.1.2, RFC 6531): what is accepted, and what is a trick."""

from __future__ import annotations

import pytest

from yuubin.smtp.address import MAX_LOCAL, MAX_PATH, Address, AddressError, is_xtext, parse_path


def ok(path: str, *, smtputf8: bool = False) -> Address:
    addr = parse_path(path, smtputf8=smtputf8)
    assert addr is not None
    return addr


def error(path: str, *, smtputf8: bool = False) -> str:
    with pytest.raises(AddressError) as info:
        parse_path(path, smtputf8=smtputf8)
    return f"{info.value.reply.code} {info.value.reply.status}"


def test_null_path() -> None:
    assert parse_path("<>", smtputf8=False) is None
    assert parse_path("<>", smtputf8=True) is None


def test_plain_mailbox() -> None:
    addr = ok("<John.Doe@Example.COM>")
    assert addr == Address("John.Doe", "example.com", False)
    assert addr.text == "John.Doe@example.com" and str(addr) == addr.text
    assert addr.key == "john.doe@example.com"
    assert not addr.routing_trick


@pytest.mark.parametrize("local", ["a", "a.b.c", "user+tag", "x_y-z", "!#$&'*+-/=?^_`{|}~", "0"])
def test_atext_local_parts(local: str) -> None:
    assert ok(f"<{local}@example.com>").local == local


@pytest.mark.parametrize("path", ["<postmaster>", "<Postmaster>", "<POSTMASTER>"])
def test_postmaster_without_domain(path: str) -> None:
    assert ok(path) == Address("postmaster", "")
    assert ok(path).text == "postmaster"


@pytest.mark.parametrize("path", ["<root>", "<postmaster.x>", "<@relay.test:postmaster>", '<"postmaster">'])
def test_only_postmaster_may_lack_a_domain(path: str) -> None:
    assert error(path) == "501 5.1.3"


# ---- quoted local parts --------------------------------------------------------------------


def test_quoted_local_part() -> None:
    addr = ok('<"John Doe"@example.com>')
    assert addr.local == "John Doe" and addr.domain == "example.com"
    assert addr.text == '"John Doe"@example.com'
    assert not addr.routing_trick


def test_quoted_local_part_with_escapes_round_trips() -> None:
    addr = ok(r'<"a\"b\\c"@example.com>')
    assert addr.local == 'a"b\\c'
    assert ok(f"<{addr.text}>") == addr


def test_needlessly_quoted_local_part_is_the_same_mailbox() -> None:
    assert ok('<"user"@example.com>') == ok("<user@example.com>")


def test_quoted_at_sign_is_a_routing_trick() -> None:
    addr = ok('<"victim@elsewhere.test"@mx.test>')
    assert addr.local == "victim@elsewhere.test" and addr.domain == "mx.test"
    assert addr.routing_trick


@pytest.mark.parametrize("path", ['<"unterminated@example.com>', '<"a"b@example.com>', '<""@example.com>',
                                  '<"a"@>', '<"a\x01"@example.com>', '<"a"example.com>'])
def test_bad_quoted_local_parts(path: str) -> None:
    assert error(path) == "501 5.1.3"


# ---- source routes and relay tricks --------------------------------------------------------


def test_source_route_is_parsed_and_flagged() -> None:
    addr = ok("<@relay.test:user@example.com>")
    assert (addr.local, addr.domain) == ("user", "example.com")
    assert addr.source_route and addr.routing_trick


def test_multi_hop_source_route() -> None:
    addr = ok("<@a.test,@b.test:user@example.com>")
    assert addr.source_route and addr.routing_trick and addr.domain == "example.com"


def test_source_route_with_quoted_local_part() -> None:
    addr = ok('<@a.test:"x y"@example.com>')
    assert addr.local == "x y" and addr.source_route


@pytest.mark.parametrize("local", ["user%elsewhere.test", "elsewhere!user", "a%b%c", "host!host2!user"])
def test_percent_and_bang_are_routing_tricks(local: str) -> None:
    addr = ok(f"<{local}@mx.test>")
    assert addr.local == local and addr.domain == "mx.test"
    assert addr.routing_trick and not addr.source_route


def test_plain_address_is_no_trick() -> None:
    assert not ok("<user.name+tag@mx.test>").routing_trick


@pytest.mark.parametrize("path", ["<user@other.test@mx.test>", "<a@b@c>", "<@a.test:user@other@mx.test>"])
def test_two_at_signs_is_bad_syntax(path: str) -> None:
    assert error(path) == "501 5.1.3"


# ---- domains and address literals ----------------------------------------------------------


@pytest.mark.parametrize(("literal", "domain"), [
    ("[192.0.2.1]", "[192.0.2.1]"),
    ("[IPv6:2001:db8::1]", "[ipv6:2001:db8::1]"),
    ("[IPv6:::1]", "[ipv6:::1]"),
    ("[ipv6:::ffff:192.0.2.1]", "[ipv6:::ffff:192.0.2.1]"),
    ("[IPv6:2001:DB8:0:0:0:0:0:1]", "[ipv6:2001:db8:0:0:0:0:0:1]"),
])
def test_address_literals(literal: str, domain: str) -> None:
    addr = ok(f"<user@{literal}>")
    assert addr.domain == domain and addr.local == "user"


@pytest.mark.parametrize("literal", [
    "[192.0.2]", "[192.0.2.256]", "[192.0.2.1", "[IPv6:2001:db8::zz]", "[IPv6:192.0.2.1]", "[2001:db8::1]",
    "[tag:content]", "[]", "[IPv6:fe80::1%eth0]", "[ 192.0.2.1]", "[010.0.0.1]",
])
def test_bad_address_literals(literal: str) -> None:
    assert error(f"<user@{literal}>") == "501 5.1.3"


@pytest.mark.parametrize("domain", ["example", "a.b.c.d.example", "xn--bcher-kva.example", "1.2.3.4", "a-b.c"])
def test_good_domains(domain: str) -> None:
    assert ok(f"<u@{domain}>").domain == domain


@pytest.mark.parametrize("domain", ["", ".", "a..b", ".a", "a.", "-a.b", "a-.b", "a_b.c", "a b", "a.b:25",
                                    "a,b", "a" * 64 + ".test"])
def test_bad_domains(domain: str) -> None:
    assert error(f"<u@{domain}>") == "501 5.1.3"


def test_domain_label_of_63_octets() -> None:
    assert ok(f"<u@{'a' * 63}.test>").domain == "a" * 63 + ".test"


@pytest.mark.parametrize("local", ["", ".a", "a.", "a..b", "a b", "a(b)", "a,b", "a:b", "a;b", "a<b", "a>b",
                                   "a[b]", "a\\b", 'a"b'])
def test_bad_local_parts(local: str) -> None:
    assert error(f"<{local}@example.com>") == "501 5.1.3"


@pytest.mark.parametrize("path", ["", "<", ">", "user@example.com", "<user@example.com", "user@example.com>"])
def test_missing_angle_brackets(path: str) -> None:
    assert error(path) == "501 5.5.4"


# ---- length limits (RFC 5321 4.5.3.1) ------------------------------------------------------


def test_local_part_of_64_octets_is_accepted_65_is_not() -> None:
    assert MAX_LOCAL == 64
    assert ok(f"<{'a' * 64}@example.com>").local == "a" * 64
    assert error(f"<{'a' * 65}@example.com>") == "501 5.1.3"
    assert error(f'<"{"a" * 65}"@example.com>') == "501 5.1.3"


def test_path_of_256_octets_is_accepted_257_is_not() -> None:
    """256 octets including the angle brackets and other punctuation (RFC 5321 4.5.3.1.3)."""
    assert MAX_PATH == 256

    def path(total: int) -> str:
        n = total - len("<a@>")  # the domain: labels of 63 octets, then whatever is left
        labels = []
        while n > 64:
            labels.append("b" * 63)
            n -= 64
        p = "<a@" + ".".join([*labels, "c" * n]) + ">"
        assert len(p) == total
        return p

    assert ok(path(256)).local == "a"
    assert error(path(257)) == "501 5.1.3"


def test_local_part_limit_counts_octets_not_characters() -> None:
    assert ok(f"<{'é' * 32}@example.com>", smtputf8=True).local == "é" * 32  # 64 octets
    assert error(f"<{'é' * 33}@example.com>", smtputf8=True) == "501 5.1.3"  # 66 octets, 33 characters


def test_path_limit_counts_octets_not_characters() -> None:
    domain = ".".join(["ü" * 24] * 4)  # 99 characters, 195 octets: a good domain
    assert ok(f"<{'a' * 56}@{domain}>", smtputf8=True).domain == domain  # 254 octets in all
    assert error(f"<{'a' * 60}@{domain}>", smtputf8=True) == "501 5.1.3"  # 258 octets, 162 characters


# ---- SMTPUTF8 (RFC 6531) -------------------------------------------------------------------


@pytest.mark.parametrize("path", ["<josé@example.com>", "<user@bücher.example>", "<用户@例子.广告>",
                                  '<"ü ü"@example.com>'])
def test_non_ascii_needs_smtputf8(path: str) -> None:
    assert error(path) == "553 5.6.7"


def test_utf8_local_part_and_domain_with_smtputf8() -> None:
    addr = ok("<用户@例子.广告>", smtputf8=True)
    assert (addr.local, addr.domain) == ("用户", "例子.广告")
    addr = ok("<José@Bücher.Example>", smtputf8=True)
    assert addr.local == "José" and addr.domain == "bücher.example"
    assert addr.key == "josé@bücher.example"


def test_utf8_quoted_local_part_with_smtputf8() -> None:
    addr = ok('<"ü ü"@example.com>', smtputf8=True)
    assert addr.local == "ü ü" and addr.text == '"ü ü"@example.com'


def test_utf8_does_not_relax_structure() -> None:
    assert error("<jo sé@example.com>", smtputf8=True) == "501 5.1.3"
    assert error("<josé@exa mple.com>", smtputf8=True) == "501 5.1.3"
    assert error("<a@b@例子.广告>", smtputf8=True) == "501 5.1.3"


# ---- xtext (RFC 3461) ----------------------------------------------------------------------


@pytest.mark.parametrize(("value", "valid"), [
    ("", True), ("abc", True), ("a+2Bb", True), ("rfc822+3Bx", True), ("a+2b", False), ("a+", False),
    ("a=b", False), ("a b", False), ("é", False), ("+41+42", True), ("a+G0", False),
])
def test_xtext(value: str, valid: bool) -> None:
    assert is_xtext(value) is valid
