"""SEARCH keys, SORT and THREAD (RFC 5256) over a selected folder's messages.

A message is read and parsed only when a key needs more than its flags, size and dates; what is
compared for SUBJECT, FROM, dates and threads follows RFC 5256 (base subject, first address's
mailbox, INTERNALDATE when there is no usable Date:), as Dovecot does (tests compare the two).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import date, datetime
from typing import Any

from yuubin.imap import mime
from yuubin.imap import protocol as P
from yuubin.imap.store import FolderView, MessageInfo


class Matcher:
    """SEARCH keys against one message at a time; the message is read and parsed only if a key needs it."""

    def __init__(self, view: FolderView, saved: list[int], now: float):
        self.view = view
        self.saved = set(saved)
        self.now = now
        self.used_modseq = False
        self._cache: dict[int, mime.ParsedMessage] = {}

    def parsed(self, info: MessageInfo) -> mime.ParsedMessage:
        msg = self._cache.get(info.uid)
        if msg is None:
            if len(self._cache) > 64:
                self._cache.clear()
            msg = self._cache[info.uid] = mime.parse(self.view.read(info.uid))
        return msg

    def header_text(self, info: MessageInfo, name: str) -> str:
        return "\n".join(mime.header_values(self.parsed(info), name))

    def match(self, key: P.Key, seq: int, info: MessageInfo) -> bool:
        op, v = key.op, key.value
        flags = info.flags
        if op == "ALL":
            return True
        if op == "AND":
            assert isinstance(v, tuple)
            return all(self.match(k, seq, info) for k in v)
        if op == "OR":
            assert isinstance(v, tuple)
            return self.match(v[0], seq, info) or self.match(v[1], seq, info)
        if op == "NOT":
            assert isinstance(v, P.Key)
            return not self.match(v, seq, info)
        if op in _FLAG_KEYS:
            flag, want = _FLAG_KEYS[op]
            return (flag in flags) == want
        if op == "RECENT":
            return info.uid in self.view.recent
        if op == "NEW":
            return info.uid in self.view.recent and "\\Seen" not in flags
        if op == "OLD":
            return info.uid not in self.view.recent
        if op == "KEYWORD":
            return str(v).lower() in {f.lower() for f in flags}
        if op == "UNKEYWORD":
            return str(v).lower() not in {f.lower() for f in flags}
        if op == "SEQ":
            assert isinstance(v, P.SeqSet)
            if v.saved:
                return info.uid in self.saved
            return v.contains(seq, len(self.view.messages))
        if op == "UID":
            assert isinstance(v, P.SeqSet)
            if v.saved:
                return info.uid in self.saved
            msgs = self.view.messages
            return v.contains(info.uid, msgs[-1].uid if msgs else 0)
        if op == "LARGER":
            return info.size > int(v)  # type: ignore[call-overload]
        if op == "SMALLER":
            return info.size < int(v)  # type: ignore[call-overload]
        if op == "MODSEQ":
            self.used_modseq = True
            return info.modseq >= int(v)  # type: ignore[call-overload]
        if op == "YOUNGER":
            return info.internaldate >= self.now - int(v)  # type: ignore[call-overload]
        if op == "OLDER":
            return info.internaldate <= self.now - int(v)  # type: ignore[call-overload]
        if op in ("BEFORE", "ON", "SINCE"):
            assert isinstance(v, datetime)
            return _date_cmp(op, datetime.fromtimestamp(info.internaldate).date(), v.date())
        if op in ("SENTBEFORE", "SENTON", "SENTSINCE"):
            assert isinstance(v, datetime)
            sent = mime.date_header(self.parsed(info))
            if sent is None:
                return False
            return _date_cmp(op[4:], sent.date(), v.date())
        if op in ("FROM", "TO", "CC", "BCC", "SUBJECT"):
            return _contains(self.header_text(info, op.capitalize()), str(v))
        if op == "HEADER":
            assert isinstance(v, tuple)
            fname, value = v
            values = mime.header_values(self.parsed(info), fname)
            if not value:
                return bool(values)
            return _contains("\n".join(values), value)
        if op == "BODY":
            return _contains(mime.text_content(self.parsed(info), headers=False), str(v))
        if op == "TEXT":
            return _contains(mime.text_content(self.parsed(info), headers=True), str(v))
        raise AssertionError(f"search key {op}")  # pragma: no cover - the core parses only these


_FLAG_KEYS = {
    "ANSWERED": ("\\Answered", True), "DELETED": ("\\Deleted", True), "DRAFT": ("\\Draft", True),
    "FLAGGED": ("\\Flagged", True), "SEEN": ("\\Seen", True), "UNANSWERED": ("\\Answered", False),
    "UNDELETED": ("\\Deleted", False), "UNDRAFT": ("\\Draft", False), "UNFLAGGED": ("\\Flagged", False),
    "UNSEEN": ("\\Seen", False),
}


def _date_cmp(op: str, day: date, ref: date) -> bool:
    if op == "BEFORE":
        return day < ref
    if op == "ON":
        return day == ref
    return day >= ref


def _contains(haystack: str, needle: str) -> bool:
    return needle.casefold() in " ".join(haystack.split()).casefold() or needle.casefold() in haystack.casefold()


def _sort_value(key: str, seq: int, info: MessageInfo, matcher: Matcher) -> Any:
    if key == "ARRIVAL":
        return int(info.internaldate)  # INTERNALDATE has whole seconds
    if key == "SIZE":
        return info.size
    if key == "DATE":  # RFC 5256: no usable Date: header, the INTERNALDATE
        d = mime.date_header(matcher.parsed(info))
        return d.timestamp() if d is not None else int(info.internaldate)
    if key == "SUBJECT":
        subj = mime.header_values(matcher.parsed(info), "Subject")
        return mime.base_subject(subj[0]).casefold() if subj else ""
    name = {"FROM": "from", "TO": "to", "CC": "cc", "DISPLAYFROM": "from", "DISPLAYTO": "to"}[key]
    raw = matcher.parsed(info).field(name)
    addrs = mime.addresses(raw) if raw is not None else []
    if not addrs:
        return ""
    name_, _adl, mailbox, host = addrs[0]
    if key.startswith("DISPLAY"):
        disp = mime.decode_words(name_) if name_ else ""
        return (disp or (mailbox or b"").decode("utf-8", "replace") + "@"
                + (host or b"").decode("utf-8", "replace")).casefold()
    return (mailbox or b"").decode("utf-8", "replace").casefold()


def sort_messages(found: list[tuple[int, MessageInfo]], criteria: tuple[str, ...], matcher: Matcher
          ) -> list[tuple[int, MessageInfo]]:
    out = list(found)  # sequence order is the final tie-break (RFC 5256 3)
    for crit in reversed(criteria):
        reverse = crit.startswith("REVERSE ")
        key = crit.removeprefix("REVERSE ")
        out.sort(key=lambda sm, k=key: _sort_value(k, sm[0], sm[1], matcher), reverse=reverse)  # type: ignore[misc]
    return out


Thread = tuple[tuple[int, MessageInfo], list["Thread"]]


def thread_messages(found: list[tuple[int, MessageInfo]], algorithm: str, matcher: Matcher) -> list[Thread]:
    def sent(sm: tuple[int, MessageInfo]) -> tuple[float, int]:
        d = mime.date_header(matcher.parsed(sm[1]))
        return (d.timestamp() if d is not None else int(sm[1].internaldate), sm[0])

    def subject(sm: tuple[int, MessageInfo]) -> str:
        s = mime.header_values(matcher.parsed(sm[1]), "Subject")
        return mime.base_subject(s[0]) if s else ""

    if algorithm == "ORDEREDSUBJECT":
        groups: dict[str, list[tuple[int, MessageInfo]]] = {}
        for sm in sorted(found, key=sent):
            groups.setdefault(subject(sm), []).append(sm)
        threads: list[Thread] = [(g[0], [(x, []) for x in g[1:]]) for g in groups.values()]
        threads.sort(key=lambda t: sent(t[0]))
        return threads
    return _references(found, matcher, sent, subject)


def _references(found: list[tuple[int, MessageInfo]], matcher: Matcher, sent: Callable[..., tuple[float, int]],
                subject: Callable[..., str]) -> list[Thread]:
    """RFC 5256 REFERENCES, steps 1-6 (subject grouping of roots included)."""
    import re as _re

    ids_re = _re.compile(r"<[^<>\s]+>")

    class Node:
        __slots__ = ("children", "msg", "parent")

        def __init__(self) -> None:
            self.msg: tuple[int, MessageInfo] | None = None
            self.parent: Node | None = None
            self.children: list[Node] = []

    table: dict[str, Node] = {}

    def node(mid: str) -> Node:
        n = table.get(mid)
        if n is None:
            n = table[mid] = Node()
        return n

    def ancestor(a: Node, b: Node) -> bool:
        while b is not None:
            if b is a:
                return True
            b = b.parent  # type: ignore[assignment]
        return False

    def link(parent: Node, child: Node) -> None:
        if child.parent is not None or ancestor(child, parent) or parent is child:
            return
        child.parent = parent
        parent.children.append(child)

    for n_, sm in enumerate(found):
        msg = matcher.parsed(sm[1])
        mids = ids_re.findall("".join(mime.header_values(msg, "Message-ID")))
        mid = mids[0] if mids and (mids[0] not in table or table[mids[0]].msg is None) else f"<dup{n_}@>"
        this = node(mid)
        this.msg = sm
        refs = ids_re.findall(" ".join(mime.header_values(msg, "References")))
        if not refs:
            refs = ids_re.findall(" ".join(mime.header_values(msg, "In-Reply-To")))[:1]
        prev: Node | None = None
        for r in refs:
            cur = node(r)
            if prev is not None and cur.parent is None:
                link(prev, cur)
            prev = cur
        if prev is not None and prev is not this:
            if this.parent is not None:
                this.parent.children.remove(this)
                this.parent = None
            link(prev, this)
    roots = [n for n in table.values() if n.parent is None]

    def prune(n: Node) -> list[Node]:
        """Drop empty containers, promoting their children (not to the root unless only one)."""
        kids: list[Node] = []
        for c in n.children:
            kids.extend(prune(c))
        n.children = kids
        for c in kids:
            c.parent = n
        if n.msg is None:
            if n.parent is None and len(kids) > 1:
                return [n]
            return kids
        return [n]

    top: list[Node] = []
    for r in roots:
        top.extend(prune(r))
    for n in top:
        n.parent = None

    def first_msg(n: Node) -> tuple[int, MessageInfo]:
        if n.msg is not None:
            return n.msg
        return min((first_msg(c) for c in n.children), key=sent)

    def is_reply(sm: tuple[int, MessageInfo]) -> bool:
        subj = mime.header_values(matcher.parsed(sm[1]), "Subject")
        return bool(subj) and (bool(_REPLY.match(subj[0])) or subj[0].rstrip().lower().endswith("(fwd)"))

    by_subject: dict[str, Node] = {}
    result: list[Node] = []
    for n in sorted(top, key=lambda n: sent(first_msg(n))):
        subj = subject(first_msg(n))
        other = by_subject.get(subj) if subj else None
        if other is None:
            by_subject[subj] = n
            result.append(n)
            continue
        if other.msg is None and n.msg is None:
            other.children.extend(n.children)
        elif other.msg is None:
            other.children.append(n)
        elif n.msg is None:
            n.children.append(other)
            result[result.index(other)] = n
            by_subject[subj] = n
        elif is_reply(n.msg) and not is_reply(other.msg):
            other.children.append(n)
        elif is_reply(other.msg) and not is_reply(n.msg):
            n.children.append(other)
            result[result.index(other)] = n
            by_subject[subj] = n
        else:
            holder = Node()
            holder.children = [other, n]
            result[result.index(other)] = holder
            by_subject[subj] = holder

    def build(n: Node) -> list[Thread]:
        kids = sorted(n.children, key=lambda c: sent(first_msg(c)))
        sub = [t for c in kids for t in build(c)]
        if n.msg is None:
            return [((0, None), sub)] if len(sub) > 1 else sub  # type: ignore[list-item]
        return [(n.msg, sub)]

    return [t for n in result for t in build(n)]


_REPLY = re.compile(r"\s*(?:\[[^\]]*\]\s*)*(?:re|fwd?)\s*(?:\[[^\]]*\])?\s*:", re.IGNORECASE)


def thread_text(threads: list[Thread], number: Callable[[tuple[int, MessageInfo]], int]) -> str:
    def one(t: Thread, top: bool) -> str:
        (sm, kids) = t
        head = "" if sm[1] is None else str(number(sm))
        if not kids:
            return f"({head})" if top else head
        if len(kids) == 1:
            rest = one(kids[0], False)
            inner = f"{head} {rest}".strip() if head else rest
        else:
            inner = (head + " " if head else "") + "".join(f"({one(k, False)})" for k in kids)
        return f"({inner})" if top else inner
    return "".join(one(t, True) for t in threads)
