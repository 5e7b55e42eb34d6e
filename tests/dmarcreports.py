"""DMARC aggregate reports as the tests need them: XML in both formats and report mails around it."""

from __future__ import annotations

import gzip
import io
import zipfile
from email.message import EmailMessage

RFC9990_NS = "urn:ietf:params:xml:ns:dmarc-2.0"

# (source IP, count, disposition, dkim, spf, header_from, dkim auth (domain, selector, result), spf auth)
Row = tuple[str, int, str, str, str, str, tuple[str, str, str] | None, tuple[str, str]]

DEFAULT_ROWS: list[Row] = [
    ("192.0.2.10", 120, "none", "pass", "pass", "example.test", ("example.test", "y1", "pass"),
     ("example.test", "pass")),
    ("203.0.113.5", 30, "reject", "fail", "fail", "example.test", None, ("evil.example", "fail")),
]


def report_xml(*, fmt: str = "rfc7489", org: str = "Big Mail Co", report_id: str = "r-1",
               domain: str = "example.test", begin: int = 1_700_000_000, end: int = 1_700_086_399,
               rows: list[Row] | None = None, extra_records: str = "") -> bytes:
    """One report's XML: RFC 7489 (no namespace, pct) or RFC 9990 (namespace, np, testing, extension)."""
    rows = DEFAULT_ROWS if rows is None else rows
    records = []
    for ip, count, disposition, dkim, spf, header_from, dkim_auth, spf_auth in rows:
        auth = ""
        if dkim_auth:
            auth += (f"<dkim><domain>{dkim_auth[0]}</domain><selector>{dkim_auth[1]}</selector>"
                     f"<result>{dkim_auth[2]}</result></dkim>")
        auth += f"<spf><domain>{spf_auth[0]}</domain><scope>mfrom</scope><result>{spf_auth[1]}</result></spf>"
        records.append(
            f"<record><row><source_ip>{ip}</source_ip><count>{count}</count><policy_evaluated>"
            f"<disposition>{disposition}</disposition><dkim>{dkim}</dkim><spf>{spf}</spf>"
            f"</policy_evaluated></row><identifiers><envelope_from>{header_from}</envelope_from>"
            f"<header_from>{header_from}</header_from></identifiers><auth_results>{auth}</auth_results>"
            + ("<ext:seen xmlns:ext=\"urn:example:ext\">x</ext:seen>" if fmt == "rfc9990" else "")
            + "</record>")
    if fmt == "rfc9990":
        head = (f'<feedback xmlns="{RFC9990_NS}"><version>1.0</version>'
                f"<report_metadata><org_name>{org}</org_name><email>dmarc@report.example</email>"
                f"<report_id>{report_id}</report_id><date_range><begin>{begin}</begin><end>{end}</end>"
                f"</date_range><generator>mailer 2.0</generator></report_metadata>"
                f"<policy_published><domain>{domain}</domain><discovery_method>treewalk</discovery_method>"
                f"<p>reject</p><sp>quarantine</sp><np>reject</np><adkim>r</adkim><aspf>r</aspf>"
                f"<testing>n</testing></policy_published>"
                f'<extension><x:thing xmlns:x="urn:example:ext">1</x:thing></extension>')
    else:
        head = (f"<feedback><report_metadata><org_name>{org}</org_name><email>dmarc@report.example</email>"
                f"<report_id>{report_id}</report_id><date_range><begin>{begin}</begin><end>{end}</end>"
                f"</date_range></report_metadata><policy_published><domain>{domain}</domain>"
                f"<adkim>r</adkim><aspf>r</aspf><p>quarantine</p><sp>none</sp><pct>100</pct>"
                f"</policy_published>")
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n{head}{"".join(records)}{extra_records}</feedback>\n'
            ).encode()


def gz(data: bytes) -> bytes:
    return gzip.compress(data)


def zipped(*members: tuple[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members:
            zf.writestr(name, data)
    return buf.getvalue()


def report_mail(attachment: bytes, *, filename: str = "report.example!example.test!1700000000!1700086399.xml.gz",
                content_type: str = "application/gzip", sender: str = "dmarc@report.example",
                to: str = "dmarc-reports@example.test") -> bytes:
    """A report mail as reporters send it: a short text part and the report attached."""
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = "Report Domain: example.test Submitter: report.example Report-ID: <r-1>"
    msg["Message-ID"] = "<r-1@report.example>"
    msg.set_content("This is an aggregate report.\n")
    maintype, subtype = content_type.split("/", 1)
    msg.add_attachment(attachment, maintype=maintype, subtype=subtype, filename=filename)
    return bytes(msg).replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
