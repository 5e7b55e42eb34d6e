"""DMARC aggregate reports: a report mail → typed records, refusing hostile input on the way.

Reports are sent by strangers, so everything in them is hostile until checked: the attachment
size is capped before anything is decompressed; gzip and zip members are decompressed in
chunks with a hard cap on the output and on the compression ratio (never read whole, then
checked); a zip must hold exactly one XML member; the XML is parsed by defusedxml with DTDs,
entities and external references forbidden, as a stream, so a record cap stops a flood of rows
before it is in memory; every value is checked (addresses parse, counts are numbers) and text
is cut to a bounded length.

Both formats are read: RFC 7489 appendix C (root `feedback`, no namespace, or the draft's
`http://dmarc.org/dmarc-xml/0.1`) and RFC 9990 (`urn:ietf:params:xml:ns:dmarc-2.0`: `np`,
`testing`, `discovery_method`, a `pass` disposition, optional SPF results and extension
elements in other namespaces, which are skipped).

Pure: bytes in, reports or a `ReportError` with a reason token out; the caller logs and stores.
The XML walk is hand-written on top of defusedxml's streaming parser because no maintained
library parses both formats with these limits.
"""

from __future__ import annotations

import email.parser
import email.policy
import gzip
import io
import ipaddress
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import Message
from typing import IO
from xml.etree.ElementTree import Element, ParseError

import defusedxml
import defusedxml.ElementTree

__all__ = [
    "NS_DMARC2",
    "AggregateReport",
    "AuthResult",
    "MailOutcome",
    "PolicyPublished",
    "ReportError",
    "ReportLimits",
    "ReportRow",
    "parse_attachment",
    "parse_report_mail",
    "parse_xml",
]

NS_DMARC2 = "urn:ietf:params:xml:ns:dmarc-2.0"  # RFC 9990
NS_DRAFT = "http://dmarc.org/dmarc-xml/0.1"  # what some RFC 7489 reporters put on the root
CHUNK = 64 * 1024
RATIO_FLOOR = 1024 * 1024  # below this much output the ratio is not checked: small files are harmless
TEXT_MAX = 256  # characters kept of a free-text field (org name, comments, error lines)
MAX_PARTS = 64  # MIME parts looked at in one mail
MAX_COUNT = 10**9  # messages one row may claim
MAX_ELEMENTS = 2_000  # elements inside one record (or other child of the root): its tree stays small


@dataclass(frozen=True, slots=True)
class ReportLimits:
    """[mailauth] report_* keys: every cap a hostile report runs into."""

    max_attachment: int = 10 * 1024 * 1024  # bytes of one attachment, as decoded from the mail
    max_xml: int = 50 * 1024 * 1024  # bytes of XML after decompression
    max_ratio: int = 100  # decompressed / compressed size
    max_records: int = 20_000  # <record> elements in one report


class ReportError(Exception):
    """A report refused: `reason` is a token for the log (`reason=...`), `detail` says more."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class AuthResult:
    """One DKIM or SPF result as the reporter saw it, before DMARC alignment."""

    method: str  # "dkim" or "spf"
    domain: str
    result: str
    selector: str = ""  # DKIM s=
    scope: str = ""  # SPF: "mfrom" or "helo"


@dataclass(frozen=True, slots=True)
class ReportRow:
    """One <record>: a source IP, how many messages, and what the reporter made of them."""

    source_ip: str
    count: int
    disposition: str  # none, quarantine, reject (RFC 9990 also: pass)
    dkim: str  # policy_evaluated: the aligned DKIM result, pass or fail
    spf: str  # policy_evaluated: the aligned SPF result
    header_from: str
    envelope_from: str = ""
    envelope_to: str = ""
    reasons: tuple[str, ...] = ()  # policy override types, e.g. "forwarded"
    auth: tuple[AuthResult, ...] = ()

    @property
    def dmarc(self) -> str:
        """DMARC passes when either aligned result passes."""
        return "pass" if "pass" in (self.dkim, self.spf) else "fail"


@dataclass(frozen=True, slots=True)
class PolicyPublished:
    domain: str
    p: str
    sp: str = ""
    np: str = ""
    adkim: str = ""
    aspf: str = ""
    pct: str = ""  # RFC 7489
    testing: str = ""  # RFC 9990 t=
    discovery_method: str = ""  # RFC 9990: "psl" or "treewalk"

    def text(self) -> str:
        """`p=reject sp=quarantine adkim=s`: the tags that were given."""
        tags = ("p", "sp", "np", "adkim", "aspf", "pct", "testing", "discovery_method")
        return " ".join(f"{t}={getattr(self, t)}" for t in tags if getattr(self, t))


@dataclass(frozen=True, slots=True)
class AggregateReport:
    format: str  # "rfc7489" or "rfc9990"
    org_name: str
    email: str
    report_id: str
    begin: int  # seconds since the epoch, UTC
    end: int
    policy: PolicyPublished
    rows: tuple[ReportRow, ...]
    errors: tuple[str, ...] = ()

    @property
    def messages(self) -> int:
        return sum(r.count for r in self.rows)


@dataclass(frozen=True, slots=True)
class MailOutcome:
    """What one report mail held: the reports read and each attachment refused, with its reason."""

    reports: tuple[AggregateReport, ...] = ()
    rejected: tuple[tuple[str, ReportError], ...] = ()  # (attachment name, why)
    attachments: int = 0  # report-like attachments found


# ---- the mail: which parts are reports ----

_GZIP_TYPES = {"application/gzip", "application/x-gzip", "application/gzip-compressed", "application/x-gunzip"}
_ZIP_TYPES = {"application/zip", "application/x-zip", "application/x-zip-compressed"}
_XML_TYPES = {"text/xml", "application/xml"}


def _kind(content_type: str, filename: str) -> str | None:
    """"gzip", "zip", "xml", or None for a part that is not a report (a text/plain note)."""
    name = filename.lower()
    if content_type in _GZIP_TYPES or name.endswith((".gz", ".gzip")):
        return "gzip"
    if content_type in _ZIP_TYPES or name.endswith(".zip"):
        return "zip"
    if content_type in _XML_TYPES or name.endswith(".xml"):
        return "xml"
    return None


def _parts(data: bytes) -> Iterator[Message]:
    msg = email.parser.BytesParser(policy=email.policy.compat32).parsebytes(data)
    for n, part in enumerate(msg.walk()):
        if n >= MAX_PARTS:
            return
        if not part.is_multipart():
            yield part


def parse_report_mail(data: bytes, limits: ReportLimits) -> MailOutcome:
    """Every report attachment of a mail, parsed; never raises (a part that fails is in `rejected`)."""
    reports: list[AggregateReport] = []
    rejected: list[tuple[str, ReportError]] = []
    found = 0
    try:
        for part in _parts(data):
            filename = _text(part.get_filename() or "", 200)
            kind = _kind(part.get_content_type().lower(), filename)
            if kind is None:
                continue
            found += 1
            name = filename or part.get_content_type()
            try:
                payload = part.get_payload(decode=True)
                if not isinstance(payload, bytes):
                    raise ReportError("bad_attachment", "no content")
                reports.append(parse_attachment(payload, kind, limits))
            except ReportError as e:
                rejected.append((name, e))
            except Exception as e:  # a parser bug must not lose the mail or stop the others
                rejected.append((name, ReportError("internal_error", type(e).__name__)))
    except Exception as e:  # the MIME structure itself could not be walked
        rejected.append(("(message)", ReportError("bad_mime", type(e).__name__)))
    if not found and not rejected:
        rejected.append(("(message)", ReportError("no_report_attachment",
                                                  "no gzip, zip or XML part in the mail")))
    return MailOutcome(tuple(reports), tuple(rejected), found)


# ---- attachments: size caps, streamed decompression ----


def parse_attachment(payload: bytes, kind: str, limits: ReportLimits) -> AggregateReport:
    """One attachment ("gzip", "zip" or "xml", as declared) → the report; ReportError when refused.

    The bytes decide over the declaration: a part called .xml that is gzip is read as gzip."""
    if len(payload) > limits.max_attachment:
        raise ReportError("attachment_too_large", f"{len(payload)} bytes, limit {limits.max_attachment}")
    if payload[:2] == b"\x1f\x8b":
        kind = "gzip"
    elif payload[:4] == b"PK\x03\x04":
        kind = "zip"
    elif kind != "xml":
        raise ReportError("bad_archive", f"declared {kind}, but the content is not {kind}")
    if kind == "gzip":
        xml = _gunzip(payload, limits)
    elif kind == "zip":
        xml = _unzip(payload, limits)
    else:
        if len(payload) > limits.max_xml:
            raise ReportError("decompressed_too_large", f"{len(payload)} bytes of XML, limit {limits.max_xml}")
        xml = payload
    return parse_xml(xml, limits)


def _read_capped(stream: IO[bytes] | gzip.GzipFile, compressed: int, limits: ReportLimits) -> bytes:
    """Read a decompressing stream chunk by chunk, stopping as soon as a cap is passed."""
    ratio_cap = max(limits.max_ratio * compressed, RATIO_FLOOR)
    out = bytearray()
    while True:
        chunk = stream.read(CHUNK)
        if not chunk:
            return bytes(out)
        out += chunk
        if len(out) > limits.max_xml:
            raise ReportError("decompressed_too_large", f"more than {limits.max_xml} bytes of XML "
                              f"from {compressed} compressed")
        if len(out) > ratio_cap:
            raise ReportError("compression_ratio", f"more than {limits.max_ratio}:1 "
                              f"({len(out)} bytes so far from {compressed})")


def _gunzip(payload: bytes, limits: ReportLimits) -> bytes:
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(payload)) as f:
            return _read_capped(f, len(payload), limits)
    except (OSError, EOFError, zlib.error) as e:
        raise ReportError("bad_archive", f"gzip: {e}") from None


def _unzip(payload: bytes, limits: ReportLimits) -> bytes:
    try:
        with zipfile.ZipFile(io.BytesIO(payload)) as zf:
            members = [i for i in zf.infolist() if not i.is_dir()]
            if len(members) != 1:
                raise ReportError("zip_members", f"{len(members)} files in the zip, expected exactly one XML file")
            info = members[0]
            if not info.filename.lower().endswith(".xml"):
                raise ReportError("zip_members", f"the zip holds {_text(info.filename, 80)!r}, not an .xml file")
            if info.flag_bits & 0x1:
                raise ReportError("bad_archive", "encrypted zip member")
            if info.file_size > limits.max_xml:
                raise ReportError("decompressed_too_large", f"the zip declares {info.file_size} bytes, "
                                  f"limit {limits.max_xml}")
            if info.file_size > max(limits.max_ratio * max(info.compress_size, 1), RATIO_FLOOR):
                raise ReportError("compression_ratio", f"the zip declares {info.file_size} bytes from "
                                  f"{info.compress_size} (more than {limits.max_ratio}:1)")
            with zf.open(info) as f:
                return _read_capped(f, max(info.compress_size, 1), limits)
    except ReportError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, OSError, EOFError, zlib.error,
            ValueError, RuntimeError) as e:
        raise ReportError("bad_archive", f"zip: {e}") from None


# ---- the XML ----


def _text(value: str | None, limit: int = TEXT_MAX) -> str:
    """Stripped, control characters dropped, cut to `limit`: safe for logs and the terminal."""
    if not value:
        return ""
    cleaned = "".join(ch for ch in value.strip() if ch.isprintable())
    return cleaned[:limit]


def _local(tag: str) -> tuple[str, str]:
    """`{ns}name` → (ns, name)."""
    if tag.startswith("{"):
        ns, _, name = tag[1:].partition("}")
        return ns, name
    return "", tag


class _Reader:
    """Child elements of one element in the report's namespace, by local name."""

    def __init__(self, ns: str):
        self.ns = ns

    def child(self, el: Element | None, name: str) -> Element | None:
        if el is None:
            return None
        for c in el:
            if _local(c.tag) == (self.ns, name):
                return c
        return None

    def children(self, el: Element | None, name: str) -> list[Element]:
        if el is None:
            return []
        return [c for c in el if _local(c.tag) == (self.ns, name)]

    def text(self, el: Element | None, name: str, limit: int = TEXT_MAX) -> str:
        return _text(c.text if (c := self.child(el, name)) is not None else None, limit)

    def required(self, el: Element | None, name: str, where: str, limit: int = TEXT_MAX) -> str:
        value = self.text(el, name, limit)
        if not value:
            raise ReportError("missing_field", f"{where}/{name}")
        return value


def _integer(text: str, where: str, low: int = 0, high: int = 2**40) -> int:
    whole = text[:-2] if text.endswith(".0") else text  # some reporters write 1700000000.0
    try:
        value = int(whole)
    except ValueError:
        raise ReportError("bad_value", f"{where}: {text[:40]!r} is not a number") from None
    if not low <= value <= high:
        raise ReportError("bad_value", f"{where}: {value} out of range")
    return value


def _result(text: str) -> str:
    """A result word, lowercased; a long or odd one is cut (reporters write "SoftFail", "unknown")."""
    return _text(text, 20).lower()


def _domain(text: str) -> str:
    return _text(text, 253).lower().rstrip(".")


def _row(r: _Reader, record: Element) -> ReportRow:
    row = r.child(record, "row")
    if row is None:
        raise ReportError("missing_field", "record/row")
    raw_ip = r.required(row, "source_ip", "record/row")
    try:
        ip = str(ipaddress.ip_address(raw_ip))
    except ValueError:
        raise ReportError("bad_value", f"record/row/source_ip: {raw_ip[:60]!r} is not an IP address") from None
    count = _integer(r.required(row, "count", "record/row"), "record/row/count", 0, MAX_COUNT)
    pe = r.child(row, "policy_evaluated")
    if pe is None:
        raise ReportError("missing_field", "record/row/policy_evaluated")
    reasons = tuple(_result(r.text(x, "type")) for x in r.children(pe, "reason") if r.text(x, "type"))
    ids = r.child(record, "identifiers")
    if ids is None:
        raise ReportError("missing_field", "record/identifiers")
    auth: list[AuthResult] = []
    ar = r.child(record, "auth_results")
    for d in r.children(ar, "dkim")[:100]:
        auth.append(AuthResult("dkim", _domain(r.text(d, "domain")), _result(r.text(d, "result")),
                               selector=r.text(d, "selector", 63)))
    for s in r.children(ar, "spf")[:10]:
        auth.append(AuthResult("spf", _domain(r.text(s, "domain")), _result(r.text(s, "result")),
                               scope=_result(r.text(s, "scope"))))
    return ReportRow(
        source_ip=ip, count=count,
        disposition=_result(r.text(pe, "disposition")) or "none",
        dkim=_result(r.text(pe, "dkim")) or "fail",
        spf=_result(r.text(pe, "spf")) or "fail",
        header_from=_domain(r.required(ids, "header_from", "record/identifiers")),
        envelope_from=_domain(r.text(ids, "envelope_from")),
        envelope_to=_domain(r.text(ids, "envelope_to")),
        reasons=reasons, auth=tuple(auth),
    )


def parse_xml(xml: bytes, limits: ReportLimits) -> AggregateReport:
    """The XML of one report → AggregateReport; ReportError naming what is wrong.

    Streamed: each <record> is read when it ends and then dropped from the tree, so memory
    follows one record, and the record cap stops a flood early."""
    reader: _Reader | None = None
    root: Element | None = None
    fmt = "rfc7489"
    metadata: Element | None = None
    policy: Element | None = None
    rows: list[ReportRow] = []
    depth = 0
    inside = 0  # elements so far inside the current child of the root
    try:
        events = defusedxml.ElementTree.iterparse(io.BytesIO(xml), events=("start", "end"), forbid_dtd=True,
                                                  forbid_entities=True, forbid_external=True)
        for event, el in events:
            if event == "start":
                depth += 1
                if depth == 2:
                    inside = 0
                elif depth > 2:
                    inside += 1
                    if inside > MAX_ELEMENTS:
                        raise ReportError("too_many_elements", f"more than {MAX_ELEMENTS} elements in one "
                                          f"<{_text(_local(el.tag)[1], 40)}> part of the report")
                if root is None:
                    root = el
                    ns, name = _local(el.tag)
                    if name != "feedback" or ns not in ("", NS_DRAFT, NS_DMARC2):
                        raise ReportError("not_a_report", f"root element {_text(el.tag, 80)!r}, expected feedback")
                    fmt = "rfc9990" if ns == NS_DMARC2 else "rfc7489"
                    reader = _Reader(ns)
                continue
            depth -= 1
            if depth != 1 or reader is None or root is None:
                continue
            ns, name = _local(el.tag)
            if ns != reader.ns:
                root.remove(el)  # an extension (RFC 9990) or noise: skipped
                continue
            if name == "record":
                if len(rows) >= limits.max_records:
                    raise ReportError("too_many_records", f"more than {limits.max_records} records")
                rows.append(_row(reader, el))
                root.remove(el)
            elif name == "report_metadata":
                metadata = el
            elif name == "policy_published":
                policy = el
    except ReportError:
        raise
    except defusedxml.DTDForbidden:
        raise ReportError("xml_dtd", "the XML has a DTD (refused: entity expansion)") from None
    except defusedxml.EntitiesForbidden:
        raise ReportError("xml_entities", "the XML declares entities (refused)") from None
    except defusedxml.ExternalReferenceForbidden:
        raise ReportError("xml_external", "the XML refers to external resources (refused)") from None
    except ParseError as e:
        raise ReportError("xml_malformed", str(e)[:120]) from None
    except (ValueError, UnicodeError) as e:  # e.g. an unknown encoding declared
        raise ReportError("xml_malformed", str(e)[:120]) from None
    if reader is None:
        raise ReportError("xml_malformed", "no root element")
    r = reader
    if metadata is None:
        raise ReportError("missing_field", "feedback/report_metadata")
    if policy is None:
        raise ReportError("missing_field", "feedback/policy_published")
    if not rows:
        raise ReportError("missing_field", "feedback/record (a report has at least one)")
    dr = r.child(metadata, "date_range")
    begin = _integer(r.required(dr, "begin", "report_metadata/date_range"), "date_range/begin")
    end = _integer(r.required(dr, "end", "report_metadata/date_range"), "date_range/end")
    if end < begin:
        raise ReportError("bad_value", f"date_range: end {end} before begin {begin}")
    published = PolicyPublished(
        domain=_domain(r.required(policy, "domain", "policy_published")),
        p=_result(r.text(policy, "p")) or "none",
        sp=_result(r.text(policy, "sp")), np=_result(r.text(policy, "np")),
        adkim=_result(r.text(policy, "adkim")), aspf=_result(r.text(policy, "aspf")),
        pct=_result(r.text(policy, "pct")), testing=_result(r.text(policy, "testing")),
        discovery_method=_result(r.text(policy, "discovery_method")),
    )
    return AggregateReport(
        format=fmt,
        org_name=r.required(metadata, "org_name", "report_metadata"),
        email=r.text(metadata, "email"),
        report_id=r.required(metadata, "report_id", "report_metadata"),
        begin=begin, end=end, policy=published, rows=tuple(rows),
        errors=tuple(_text(e.text) for e in r.children(metadata, "error")[:20] if e.text),
    )
