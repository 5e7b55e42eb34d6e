"""Counts of what the server did, taken from its own log events.

Every decision yuubin makes is already one `event=NAME key=value ...` log line (a rejection with
its stage, check and reason; a lockout; a delivery). Counting those records — instead of calling
a metrics library from every module — means `yuubin status`, the Prometheus metrics and the log
can never disagree, and a new event (IMAP, mail authentication) is counted the day it is logged.

Per event name a plain count; for the events in LABELLED also a count per label values (parsed
from the formatted message only for those); for the last hour a per-minute count of accepted
messages and rejections; a few recent DNSBL hits; and durations (session length, delivery
delay) in fixed buckets. With several workers each writes its tally to a file now and then and the
primary adds them up (`merge`).
"""

from __future__ import annotations

import logging
import re
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from yuubin.logs import fields

# Events counted by label values, and which fields are the labels.
LABELLED: dict[str, tuple[str, ...]] = {
    "reject": ("stage", "check"),
    "connect": ("listener",),
    "refused": ("listener", "reason"),
    "auth_failed": (),
    "auth_lockout": (),
    "sent": (),
    "failed": (),
    "deferred": (),
    "expired": (),
    "delivered": (),
    "accepted": (),
    "disconnect": (),
}
# Durations observed from a field of an event, in seconds: (event, field) -> metric name.
DURATIONS: dict[tuple[str, str], str] = {
    ("disconnect", "duration"): "session_seconds",
    ("sent", "delay"): "delivery_seconds",
    ("delivered", "delay"): "delivery_seconds",
}
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 3600.0)
RECENT_HITS = 10  # DNSBL hits kept for `status`
WINDOW_MINUTES = 60
_ZONE = re.compile(r"listed on (\S+)")

def _seconds(value: object) -> float | None:
    if isinstance(value, int | float):
        return float(value)
    if not isinstance(value, str):
        return None
    try:
        return float(value.removesuffix("s"))
    except ValueError:
        return None


_PLACEHOLDER = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(?:\d+|\*)?(?:\.(?:\d+|\*))?[diouxXeEfFgGcrsa%]")
_KEY_BEFORE = re.compile(r'(\w+)="?$')


class _Spec:
    """What one log format string says: its event name, and for the fields counted, which
    argument holds each — so a record is counted from its args, without formatting or parsing it."""

    __slots__ = ("durations", "labels", "name", "needed", "positions")

    def __init__(self, name: str, positions: dict[str, int]):
        self.name = name
        self.positions = positions
        self.labels = LABELLED.get(name)
        self.durations = [(metric, field) for (event, field), metric in DURATIONS.items() if event == name]
        needed = set(self.labels or ()) | {field for _m, field in self.durations}
        if name == "reject":
            needed |= {"stage", "check", "client", "reason"}
        self.needed = needed

    @classmethod
    def of(cls, msg: str) -> _Spec:
        end = msg.find(" ")
        positions: dict[str, int] = {}
        i = 0
        for m in _PLACEHOLDER.finditer(msg):
            if m.group() == "%%":
                continue
            key = _KEY_BEFORE.search(msg, 0, m.start())
            if key:
                positions[key.group(1)] = i
            i += 1
        return cls(msg[6:end] if end > 0 else msg[6:], positions)

    def values(self, record: logging.LogRecord) -> dict[str, object] | None:
        args = record.args
        if isinstance(args, tuple) and self.needed <= self.positions.keys():
            try:
                return {k: args[self.positions[k]] for k in self.needed}
            except IndexError:
                return None
        try:  # a field written into the format itself: read the formatted line
            return dict(fields(record.getMessage()))
        except (TypeError, ValueError):  # a malformed record is the logging module's to report
            return None


class EventTally(logging.Handler):
    """A logging handler that counts yuubin's `event=` records (in the event loop's thread)."""

    def __init__(self, clock: Callable[[], float] = time.time):
        super().__init__(logging.INFO)
        self.clock = clock
        self.events: Counter[str] = Counter()
        self.labelled: Counter[tuple[str, tuple[str, ...]]] = Counter()
        self.minutes: dict[int, Counter[str]] = {}  # minute -> "accepted" / "reject stage/check" counts
        self.hits: deque[dict[str, Any]] = deque(maxlen=RECENT_HITS)
        self.durations: dict[str, list[float]] = {}  # metric -> counts per bucket (+Inf last), then sum
        self._specs: dict[str, _Spec] = {}  # per format string: what to take from a record's args

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.msg
        if not isinstance(msg, str) or not msg.startswith("event="):
            return
        spec = self._specs.get(msg)
        if spec is None:
            spec = self._specs[msg] = _Spec.of(msg)
        name = spec.name
        self.events[name] += 1
        if spec.labels is None:
            return
        f = spec.values(record)
        if f is None:
            return
        if spec.labels:
            self.labelled[(name, tuple(str(f.get(k, "")) for k in spec.labels))] += 1
        for metric, field in spec.durations:
            value = _seconds(f.get(field))
            if value is not None:
                self._observe(metric, value)
        if name in ("accepted", "reject"):
            now = self.clock()
            minute = int(now // 60)
            bucket = self.minutes.get(minute)
            if bucket is None:
                bucket = self.minutes[minute] = Counter()
                for old in [m for m in self.minutes if m <= minute - WINDOW_MINUTES]:
                    del self.minutes[old]
            bucket["accepted" if name == "accepted" else f"{f.get('stage', '')}/{f.get('check', '')}"] += 1
            if name == "reject" and f.get("check") == "dnsbl":
                reason = str(f.get("reason", ""))
                self.hits.append({"time": now, "client": str(f.get("client", "")), "reason": reason})
                zone = _ZONE.match(reason)
                self.labelled[("dnsbl_hit", (zone.group(1) if zone else "",))] += 1

    def _observe(self, metric: str, value: float) -> None:
        h = self.durations.get(metric)
        if h is None:
            h = self.durations[metric] = [0.0] * (len(BUCKETS) + 2)
        for i, bound in enumerate(BUCKETS):
            if value <= bound:
                h[i] += 1
                break
        else:
            h[len(BUCKETS)] += 1
        h[-1] += value

    def snapshot(self) -> dict[str, Any]:
        """Everything counted so far as JSON-able data (what a worker hands the primary)."""
        return {
            "events": dict(self.events),
            "labelled": [[n, list(k), c] for (n, k), c in self.labelled.items()],
            "minutes": {str(m): dict(c) for m, c in self.minutes.items()},
            "hits": list(self.hits),
            "durations": {k: list(v) for k, v in self.durations.items()},
        }


def merge(snapshots: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Several processes' snapshots added up into one."""
    events: Counter[str] = Counter()
    labelled: Counter[tuple[str, tuple[str, ...]]] = Counter()
    minutes: dict[str, Counter[str]] = {}
    hits: list[dict[str, Any]] = []
    durations: dict[str, list[float]] = {}
    for s in snapshots:
        events.update(s.get("events", {}))
        for name, key, count in s.get("labelled", []):
            labelled[(name, tuple(key))] += count
        for m, c in s.get("minutes", {}).items():
            minutes.setdefault(m, Counter()).update(c)
        hits.extend(s.get("hits", []))
        for k, v in s.get("durations", {}).items():
            have = durations.setdefault(k, [0.0] * len(v))
            for i, x in enumerate(v[:len(have)]):
                have[i] += x
    hits.sort(key=lambda h: h.get("time", 0))
    return {
        "events": dict(events),
        "labelled": [[n, list(k), c] for (n, k), c in labelled.items()],
        "minutes": {m: dict(c) for m, c in minutes.items()},
        "hits": hits[-RECENT_HITS:],
        "durations": durations,
    }


def last_hour(snapshot: Mapping[str, Any], now: float) -> dict[str, Any]:
    """Accepted messages and rejections by stage/check over the last 60 minutes."""
    since = int(now // 60) - WINDOW_MINUTES
    total: Counter[str] = Counter()
    for m, c in snapshot.get("minutes", {}).items():
        if int(m) > since:
            total.update(c)
    accepted = total.pop("accepted", 0)
    return {"accepted": accepted, "rejected": dict(total.most_common())}
