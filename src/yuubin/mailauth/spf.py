"""SPF (RFC 7208): may this IP address send mail for this domain?

Hand-written because no good async library exists: pyspf is synchronous, unmaintained since
2020 and uses a deprecated dnspython API. This evaluator asks DNS only through
``yuubin.dns.DnsLookup`` (so it shares the server's resolver, cache and timeout) and is checked
against the RFC 7208 test suite (tests/test_spf_suite.py).

``check_host`` is the function of RFC 7208 section 4; ``check_sender`` picks the identity the
way an MX does: MAIL FROM, or the HELO name when MAIL FROM is the null sender <>. The limits
of section 4.6.4 are enforced: 10 DNS-querying terms, 2 void lookups, 10 MX names, 10 PTR
names. Time (for the %{t} macro) is an input.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import urllib.parse
from dataclasses import dataclass, field

from yuubin.dns import DnsLookup, LookupResult

__all__ = ["SpfResult", "check_host", "check_sender"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

MAX_DNS_TERMS = 10  # RFC 7208 4.6.4: include, a, mx, ptr, exists, redirect
MAX_VOID_LOOKUPS = 2  # RFC 7208 4.6.4: lookups answered with NXDOMAIN or no records
MAX_MX_NAMES = 10
MAX_PTR_NAMES = 10

_NAME = re.compile(r"[a-z][a-z0-9\-_.]*\Z", re.I)
_MECHANISMS = ("all", "include", "a", "mx", "ptr", "ip4", "ip6", "exists")
_MACRO = re.compile(r"%(?:\{([slodiphcrtv])([0-9]*)(r?)([.\-+,/_=]*)\}|(%)|(_)|(-))", re.I)
_TOPLABEL = re.compile(r"(?=[a-z0-9-]*[a-z])[a-z0-9]([a-z0-9-]*[a-z0-9])?\Z", re.I)


@dataclass(frozen=True, slots=True)
class SpfResult:
    """One check_host outcome; ``result`` is an RFC 7208 result (and RFC 8601 spf= value)."""

    result: str  # none|neutral|pass|fail|softfail|temperror|permerror
    domain: str  # the domain checked
    identity: str  # "mailfrom" or "helo"
    reason: str  # short text for the log and the Authentication-Results comment
    explanation: str = ""  # the domain's exp= text for a fail, if any


class _Error(Exception):
    def __init__(self, result: str, reason: str):
        super().__init__(reason)
        self.result = result
        self.reason = reason


@dataclass(slots=True)
class _State:
    """What one evaluation shares across include: and redirect=: the limits and the inputs."""

    lookup: DnsLookup
    ip: IPAddress
    sender: str
    helo: str
    receiver: str
    now: float
    terms: int = 0
    voids: int = 0
    validated: dict[str, str] = field(default_factory=dict)

    def count_term(self) -> None:
        self.terms += 1
        if self.terms > MAX_DNS_TERMS:
            raise _Error("permerror", f"more than {MAX_DNS_TERMS} DNS-querying terms")

    async def query(self, name: str, rdtype: str, *, void_counts: bool = True) -> tuple[str, ...]:
        """Records of ``name``; a DNS failure raises temperror, an empty answer counts as void."""
        r = await self.lookup.lookup(name, rdtype)
        if r.status in ("timeout", "servfail"):
            raise _Error("temperror", f"DNS {r.status} for {name} {rdtype}")
        if r.status != "ok":
            if void_counts:
                self.voids += 1
                if self.voids > MAX_VOID_LOOKUPS:
                    raise _Error("permerror", f"more than {MAX_VOID_LOOKUPS} void DNS lookups")
            return ()
        return r.records


@dataclass(frozen=True, slots=True)
class _Term:
    qualifier: str
    name: str  # mechanism name (lowercase) or modifier name
    arg: str | None  # the domain-spec or network as written
    cidr4: int | None = None
    cidr6: int | None = None
    modifier: bool = False


def _is_ipv4(ip: IPAddress) -> bool:
    return isinstance(ip, ipaddress.IPv4Address)


def _normal_ip(ip: IPAddress) -> IPAddress:
    """An IPv4-mapped IPv6 client is evaluated as IPv4 (RFC 7208 5: matching is by IP version)."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _valid_domain(domain: str) -> bool:
    """A multi-label name with no empty or over-long label (RFC 7208 4.3)."""
    d = domain[:-1] if domain.endswith(".") else domain
    labels = d.split(".")
    return (len(labels) >= 2 and all(0 < len(x) <= 63 for x in labels) and len(d) <= 253
            )


async def check_sender(ip: IPAddress, mail_from: str | None, helo: str, lookup: DnsLookup, *,
                       receiver: str = "unknown", now: float = 0.0) -> SpfResult:
    """The MX's check: MAIL FROM's domain, or the HELO name for the null sender (RFC 7208 2.4)."""
    if mail_from:
        local, _, domain = mail_from.rpartition("@")
        return await check_host(ip, domain, mail_from if local else f"postmaster@{domain}", lookup,
                                helo=helo, receiver=receiver, now=now)
    return await check_host(ip, helo, f"postmaster@{helo}", lookup, helo=helo, receiver=receiver, now=now,
                            identity="helo")


async def check_host(ip: IPAddress, domain: str, sender: str, lookup: DnsLookup, *, helo: str = "",
                     receiver: str = "unknown", now: float = 0.0, identity: str = "mailfrom") -> SpfResult:
    """RFC 7208 check_host(): the result for ``ip`` sending as ``sender`` from ``domain``."""
    domain = domain.lower().rstrip(".") if domain else ""
    if domain and not domain.isascii():  # an SMTPUTF8 sender's U-labels: DNS knows the A-labels
        try:
            domain = domain.encode("idna").decode("ascii")
        except UnicodeError:
            return SpfResult("none", domain, identity, "domain is not a valid IDN")
    if not domain or not _valid_domain(domain) or domain.startswith("["):
        return SpfResult("none", domain, identity, "no valid domain to check")
    local, at, _ = sender.rpartition("@")
    if not at or not local:
        sender = f"postmaster@{domain}"
    st = _State(lookup, _normal_ip(ip), sender, helo, receiver, now)
    try:
        result, reason, exp = await _check(st, domain, top=True)
    except _Error as e:
        return SpfResult(e.result, domain, identity, e.reason)
    return SpfResult(result, domain, identity, reason, exp)


async def _record(st: _State, domain: str) -> str | None:
    """The one SPF record of ``domain`` (RFC 7208 4.4, 4.5); None when it has none."""
    r: LookupResult = await st.lookup.lookup(domain, "TXT")
    if r.status in ("timeout", "servfail"):
        raise _Error("temperror", f"DNS {r.status} for {domain} TXT")
    if r.status != "ok":
        return None
    found = [t for t in r.records if t[:6].lower() == "v=spf1" and (len(t) == 6 or t[6] == " ")]
    if len(found) > 1:
        raise _Error("permerror", f"{domain} has {len(found)} SPF records")
    return found[0] if found else None


async def _check(st: _State, domain: str, *, top: bool) -> tuple[str, str, str]:
    """Evaluate ``domain``'s record: (result, reason, explanation)."""
    text = await _record(st, domain)
    if text is None:
        return "none", f"no SPF record at {domain}", ""
    terms = _parse(text)
    redirect = exp = None
    for t in terms:
        if t.modifier and t.name == "redirect":
            redirect = t
        elif t.modifier and t.name == "exp":
            exp = t
    for t in terms:
        if t.modifier:
            continue
        if await _matches(st, t, domain):
            result = {"+": "pass", "-": "fail", "~": "softfail", "?": "neutral"}[t.qualifier]
            arg = f":{t.arg}" if t.arg is not None else ""
            reason = f"{st.ip} matched {t.qualifier if t.qualifier != '+' else ''}{t.name}{arg} of {domain}"
            explanation = ""
            if result == "fail" and exp is not None and exp.arg is not None:
                explanation = await _explain(st, exp.arg, domain)
            return result, reason, explanation
    if redirect is not None and redirect.arg is not None:
        st.count_term()
        target = await _expand_domain(st, redirect.arg, domain)
        if not _valid_domain(target):
            raise _Error("permerror", f"redirect to an invalid domain {target!r}")
        result, reason, explanation = await _check(st, target, top=False)
        if result == "none":
            raise _Error("permerror", f"redirect to {target}, which has no SPF record")
        return result, reason, explanation
    return "neutral", f"no mechanism of {domain} matched {st.ip}", ""


@functools.lru_cache(maxsize=512)
def _parse(text: str) -> tuple[_Term, ...]:
    """All terms of a record; any syntax error anywhere is a permerror (RFC 7208 4.6).

    Memoized on the record's text (a pure function: the same text always parses the same, and
    an error is raised again each time), so a popular record is parsed once, not per message."""
    if not text.isascii():
        raise _Error("permerror", "SPF record is not 7-bit ASCII")
    terms: list[_Term] = []
    seen: set[str] = set()
    for raw in text[6:].split(" "):
        if not raw:
            continue
        m = re.match(r"([a-z][a-z0-9\-_.]*)=(.*)\Z", raw, re.I | re.S)
        if m and m.group(1).lower() not in _MECHANISMS:
            name = m.group(1).lower()
            _check_macro_string(m.group(2), raw)
            if name in ("redirect", "exp"):
                if name in seen:
                    raise _Error("permerror", f"{name}= appears twice")
                seen.add(name)
                _check_domain_spec(m.group(2), raw)
            terms.append(_Term("+", name, m.group(2), modifier=True))
            continue
        terms.append(_parse_directive(raw))
    return tuple(terms)


def _parse_directive(raw: str) -> _Term:
    qualifier = "+"
    body = raw
    if body[:1] in "+-~?" and body:
        qualifier, body = body[0], body[1:]
    m = re.match(r"([a-z0-9]+)(.*)\Z", body, re.I | re.S)
    if not m:
        raise _Error("permerror", f"bad term {raw!r}")
    name, rest = m.group(1).lower(), m.group(2)
    if name not in _MECHANISMS:
        raise _Error("permerror", f"unknown mechanism {raw!r}")
    if name == "all":
        if rest:
            raise _Error("permerror", f"bad term {raw!r}")
        return _Term(qualifier, name, None)
    if name in ("ip4", "ip6"):
        if not rest.startswith(":"):
            raise _Error("permerror", f"{name} needs a network: {raw!r}")
        net, slash, length = rest[1:].partition("/")
        try:
            if name == "ip4":
                if not re.fullmatch(r"\d{1,3}(\.\d{1,3}){3}", net):
                    raise ValueError(net)
                ipaddress.IPv4Address(net)
            else:
                ipaddress.IPv6Address(net)
        except ValueError:
            raise _Error("permerror", f"bad address in {raw!r}") from None
        cidr = _cidr(length, 32 if name == "ip4" else 128, raw) if slash else None
        if name == "ip4":
            return _Term(qualifier, name, net, cidr4=cidr)
        return _Term(qualifier, name, net, cidr6=cidr)
    if name in ("a", "mx"):
        spec, cidr4, cidr6 = _dual_cidr(rest, raw)
        return _Term(qualifier, name, spec, cidr4, cidr6)
    # include, exists, ptr
    if name == "ptr" and not rest:
        return _Term(qualifier, name, None)
    if not rest.startswith(":") or len(rest) == 1:
        raise _Error("permerror", f"{name} needs a domain: {raw!r}")
    spec = rest[1:]
    _check_domain_spec(spec, raw)
    return _Term(qualifier, name, spec)


def _cidr(text: str, top: int, raw: str) -> int:
    if not re.fullmatch(r"0|[1-9][0-9]{0,2}", text) or int(text) > top:
        raise _Error("permerror", f"bad prefix length in {raw!r}")
    return int(text)


def _dual_cidr(rest: str, raw: str) -> tuple[str | None, int | None, int | None]:
    """a/mx arguments: [":" domain-spec] [ "/" ip4-cidr ] [ "//" ip6-cidr ]."""
    cidr4 = cidr6 = None
    m = re.search(r"(?:/([0-9]+))?(?://([0-9]+))?\Z", rest)
    assert m is not None
    if m.group(1) is not None:
        cidr4 = _cidr(m.group(1), 32, raw)
    if m.group(2) is not None:
        cidr6 = _cidr(m.group(2), 128, raw)
    rest = rest[: m.start()]
    if not rest:
        return None, cidr4, cidr6
    if not rest.startswith(":") or len(rest) == 1:
        raise _Error("permerror", f"bad term {raw!r}")
    spec = rest[1:]
    _check_domain_spec(spec, raw)
    return spec, cidr4, cidr6


def _check_macro_string(spec: str, raw: str, *, exp_text: bool = False) -> None:
    """Every % must start a valid macro; c, r and t only in exp= text (RFC 7208 7.1)."""
    pos = 0
    while (i := spec.find("%", pos)) >= 0:
        m = _MACRO.match(spec, i)
        if not m:
            raise _Error("permerror", f"bad macro in {raw!r}")
        if m.group(1) and m.group(1).lower() in "crt" and not exp_text:
            raise _Error("permerror", f"macro %{{{m.group(1)}}} outside exp= text in {raw!r}")
        pos = m.end()


def _check_domain_spec(spec: str, raw: str) -> None:
    """domain-spec = macro-string domain-end; domain-end is a toplabel or ends with a macro."""
    _check_macro_string(spec, raw)
    if not spec:
        raise _Error("permerror", f"empty domain in {raw!r}")
    body = spec[:-1] if spec.endswith(".") else spec
    if re.search(r"%\{[a-z][0-9]*r?[.\-+,/_=]*\}\Z", body, re.I):
        return
    top = body.rsplit(".", 1)
    if len(top) < 2 or not _TOPLABEL.match(top[1]):
        raise _Error("permerror", f"bad domain in {raw!r}")


async def _expand(st: _State, spec: str, domain: str, *, exp: bool = False) -> str:
    """Macro expansion (RFC 7208 7)."""
    out: list[str] = []
    pos = 0
    for m in _MACRO.finditer(spec):
        out.append(spec[pos:m.start()])
        pos = m.end()
        if m.group(5):
            out.append("%")
            continue
        if m.group(6):
            out.append(" ")
            continue
        if m.group(7):
            out.append("%20")
            continue
        letter, digits, reverse, delims = m.group(1), m.group(2), m.group(3), m.group(4)
        value = await _macro_value(st, letter.lower(), domain, exp)
        parts = re.split("[" + re.escape(delims or ".") + "]", value)
        if reverse:
            parts.reverse()
        if digits:
            n = int(digits)
            if n == 0:
                raise _Error("permerror", "macro keeps zero labels")
            parts = parts[-n:]
        text = ".".join(parts)
        if letter.isupper():
            text = urllib.parse.quote(text, safe="")
        out.append(text)
    out.append(spec[pos:])
    return "".join(out)


async def _macro_value(st: _State, letter: str, domain: str, exp: bool) -> str:
    local, _, sdomain = st.sender.rpartition("@")
    ip = st.ip
    if letter in "crt" and not exp:
        raise _Error("permerror", f"macro %{{{letter}}} outside exp=")
    match letter:
        case "s":
            return st.sender
        case "l":
            return local
        case "o":
            return sdomain
        case "d":
            return domain
        case "i":
            if _is_ipv4(ip):
                return str(ip)
            return ".".join(ip.exploded.replace(":", ""))
        case "p":
            return await _validated_name(st, domain)
        case "v":
            return "in-addr" if _is_ipv4(ip) else "ip6"
        case "h":
            return st.helo
        case "c":
            return str(ip)
        case "r":
            return st.receiver
        case _:  # "t"
            return str(int(st.now))


async def _validated_name(st: _State, domain: str) -> str:
    """%{p}: a validated reverse name of the client, best effort (RFC 7208 7.3 discourages it)."""
    if domain in st.validated:
        return st.validated[domain]
    try:
        names = await _validated_ptr_names(st, count=False)
    except _Error:
        names = []
    pick = "unknown"
    for n in names:
        if n == domain or n.endswith("." + domain):
            pick = n
            break
    else:
        if names:
            pick = names[0]
    st.validated[domain] = pick
    return pick


def _truncate(name: str) -> str:
    """An expanded name over 253 characters loses left labels until it fits (RFC 7208 7.3)."""
    name = name.rstrip(".")
    while len(name) > 253 and "." in name:
        name = name.split(".", 1)[1]
    return name


async def _expand_domain(st: _State, spec: str, domain: str) -> str:
    return _truncate(await _expand(st, spec, domain)).lower()


async def _target(st: _State, t: _Term, domain: str) -> str:
    return domain if t.arg is None else await _expand_domain(st, t.arg, domain)


def _in_net(ip: IPAddress, addr: str, cidr4: int | None, cidr6: int | None) -> bool:
    try:
        other = ipaddress.ip_address(addr)
    except ValueError:
        return False
    if other.version != ip.version:
        return False
    bits = ip.max_prefixlen
    length = (32 if cidr4 is None else cidr4) if bits == 32 else (128 if cidr6 is None else cidr6)
    return int(ip) >> (bits - length) == int(other) >> (bits - length)


async def _addresses(st: _State, name: str, *, void_counts: bool = True) -> tuple[str, ...]:
    return await st.query(name, "A" if _is_ipv4(st.ip) else "AAAA", void_counts=void_counts)


async def _matches(st: _State, t: _Term, domain: str) -> bool:
    ip = st.ip
    match t.name:
        case "all":
            return True
        case "ip4" | "ip6":
            assert t.arg is not None
            return _in_net(ip, t.arg, t.cidr4, t.cidr6)
        case "a":
            st.count_term()
            target = await _target(st, t, domain)
            if not _valid_domain(target):
                return False
            return any(_in_net(ip, a, t.cidr4, t.cidr6) for a in await _addresses(st, target))
        case "mx":
            st.count_term()
            target = await _target(st, t, domain)
            if not _valid_domain(target):
                return False
            exchanges = await st.query(target, "MX")
            if len(exchanges) > MAX_MX_NAMES:
                raise _Error("permerror", f"{target} has more than {MAX_MX_NAMES} MX records")
            for mx in exchanges:
                host = mx.split()[-1].rstrip(".")
                if not host:
                    continue
                if any(_in_net(ip, a, t.cidr4, t.cidr6) for a in await _addresses(st, host)):
                    return True
            return False
        case "ptr":
            st.count_term()
            target = await _target(st, t, domain)
            try:
                names = await _validated_ptr_names(st)
            except _Error as e:
                if e.result == "temperror":
                    return False  # RFC 7208 5.5: a DNS error here is no match
                raise
            return any(n == target or n.endswith("." + target) for n in names)
        case "exists":
            st.count_term()
            target = await _target(st, t, domain)
            if not _valid_domain(target):
                return False
            return bool(await st.query(target, "A"))
        case _:  # include
            st.count_term()
            target = await _target(st, t, domain)
            if not _valid_domain(target):
                raise _Error("permerror", f"include of an invalid domain {target!r}")
            result, reason, _ = await _check(st, target, top=False)
            if result == "pass":
                return True
            if result in ("fail", "softfail", "neutral"):
                return False
            if result == "none":
                raise _Error("permerror", f"include:{target} has no SPF record")
            raise _Error(result, reason)


async def _validated_ptr_names(st: _State, *, count: bool = True) -> list[str]:
    """The client's reverse names whose forward lookup gives the client back (RFC 7208 5.5)."""
    ip = st.ip
    rev = ip.reverse_pointer
    names = await st.query(rev, "PTR", void_counts=count)
    out: list[str] = []
    for name in names[:MAX_PTR_NAMES]:
        host = name.rstrip(".").lower()
        try:
            addrs = await _addresses(st, host, void_counts=False)
        except _Error:
            continue
        if any(_in_net(ip, a, None, None) for a in addrs):
            out.append(host)
    return out


async def _explain(st: _State, spec: str, domain: str) -> str:
    """The exp= text for a fail; any problem just means no explanation (RFC 7208 6.2)."""
    try:
        target = await _expand_domain(st, spec, domain)
        if not _valid_domain(target):
            return ""
        r = await st.lookup.lookup(target, "TXT")
        if r.status != "ok" or len(r.records) != 1:
            return ""
        text = r.records[0]
        if not text.isascii():
            return ""
        _check_macro_string(text, text, exp_text=True)
        return await _expand(st, text, domain, exp=True)
    except _Error:
        return ""
