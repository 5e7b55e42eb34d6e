"""Country of an IP address, from an RIR delegated-stats file or a MaxMind-format .mmdb database.

Delegated-stats files (`delegated-apnic-latest`, ARIN/RIPE/LACNIC/AFRINIC alike, also the
"extended" variant) are `registry|cc|type|start|value|date|status` lines. They are read once at
start into sorted, merged ranges per address family, so a lookup is one bisect. A .mmdb file is
read with `maxminddb` (MaxMind's own reader). The parser is written here because no maintained
PyPI package reads the RIR format; it is a few lines and exercised by tests with a made-up file.
"""

from __future__ import annotations

import bisect
import ipaddress
from collections.abc import Iterator
from pathlib import Path
from typing import Any

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class GeoError(Exception):
    """The geo source is missing or unreadable (a config error at start)."""


class _Ranges:
    """Sorted, non-overlapping (first, last, country) integer ranges of one address family."""

    def __init__(self, items: list[tuple[int, int, str]]):
        items.sort()
        merged: list[tuple[int, int, str]] = []
        for first, last, cc in items:
            if merged and merged[-1][2] == cc and merged[-1][1] + 1 >= first:
                merged[-1] = (merged[-1][0], max(merged[-1][1], last), cc)
            else:
                merged.append((first, last, cc))
        self.starts = [m[0] for m in merged]
        self.items = merged

    def find(self, n: int) -> str | None:
        i = bisect.bisect_right(self.starts, n) - 1
        if i >= 0 and self.items[i][0] <= n <= self.items[i][1]:
            return self.items[i][2]
        return None


class GeoDatabase:
    def __init__(self, source: str):
        self.source = source
        self._v4: _Ranges | None = None
        self._v6: _Ranges | None = None
        self._mmdb: Any = None  # a maxminddb.Reader, imported only when a .mmdb is used

    @classmethod
    def load(cls, source: str) -> GeoDatabase:
        db = cls(source)
        path = Path(source)
        try:
            if path.suffix == ".mmdb":
                import maxminddb
                db._mmdb = maxminddb.open_database(str(path))
            else:
                db._load_delegated(path.read_text(encoding="ascii", errors="replace"))
        except OSError as e:
            raise GeoError(f"geo.source: cannot read {source}: {e.strerror or e}") from None
        except (ValueError, RuntimeError) as e:  # maxminddb.InvalidDatabaseError is a RuntimeError
            raise GeoError(f"geo.source: {source}: not a country database: {e}") from None
        return db

    def _load_delegated(self, text: str) -> None:
        v4: list[tuple[int, int, str]] = []
        v6: list[tuple[int, int, str]] = []
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            f = line.split("|")
            if len(f) < 7 or f[2] not in ("ipv4", "ipv6") or f[1] in ("*", "") or f[6] not in (
                    "allocated", "assigned"):
                continue  # version line, summary lines, available/reserved space
            cc = f[1].upper()
            try:
                if f[2] == "ipv4":
                    first = int(ipaddress.IPv4Address(f[3]))
                    v4.append((first, first + int(f[4]) - 1, cc))
                else:
                    net = ipaddress.IPv6Network(f"{f[3]}/{int(f[4])}", strict=False)
                    v6.append((int(net.network_address), int(net.broadcast_address), cc))
            except ValueError:
                continue
        if not v4 and not v6:
            raise ValueError("no allocated/assigned ipv4 or ipv6 lines (not a delegated-stats file?)")
        self._v4, self._v6 = _Ranges(v4), _Ranges(v6)

    def country(self, ip: IPAddress) -> str | None:
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        if self._mmdb is not None:
            rec = self._mmdb.get(ip)
            if not isinstance(rec, dict):
                return None
            for k in ("country", "registered_country"):
                code = (rec.get(k) or {}).get("iso_code")
                if code:
                    return str(code).upper()
            return None
        ranges = self._v4 if ip.version == 4 else self._v6
        return ranges.find(int(ip)) if ranges else None

    def networks(self, country: str) -> Iterator[IPNetwork]:
        """Every prefix of a country (for firewall sets)."""
        country = country.upper()
        if self._mmdb is not None:
            for net, rec in self._mmdb:
                if isinstance(rec, dict):
                    code = ((rec.get("country") or rec.get("registered_country") or {}).get("iso_code") or "")
                    if code.upper() == country:
                        yield net
            return
        for ranges, cls in ((self._v4, ipaddress.IPv4Address), (self._v6, ipaddress.IPv6Address)):
            for first, last, cc in (ranges.items if ranges else []):
                if cc == country:
                    yield from ipaddress.summarize_address_range(cls(first), cls(last))


class AccessList:
    """A listener's `allow` list: CIDRs and country codes; empty means everyone."""

    def __init__(self, networks: tuple[IPNetwork, ...], countries: tuple[str, ...], geo: GeoDatabase | None):
        if countries and geo is None:
            raise GeoError("a country in allow needs geo.source")
        self.networks = networks
        self.countries = frozenset(countries)
        self.geo = geo

    @property
    def open(self) -> bool:
        return not self.networks and not self.countries

    def allows(self, ip: IPAddress) -> tuple[bool, str]:
        """(allowed, why) — the why goes into the log line."""
        if self.open:
            return True, "no allow list"
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        for net in self.networks:
            if ip.version == net.version and ip in net:
                return True, f"in {net}"
        if self.countries and self.geo is not None:
            cc = self.geo.country(ip)
            if cc in self.countries:
                return True, f"country {cc}"
            return False, f"country {cc or 'unknown'} not in allow list"
        return False, "not in allow list"
