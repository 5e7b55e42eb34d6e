"""Who receives mail here: accounts, aliases, plus-addressing, postmaster and the DMARC report address.

Resolution reads the store on every call so CLI changes apply to a running server at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from yuubin.smtp.address import Address, AddressError, parse_path
from yuubin.store import Store

MAX_ALIAS_DEPTH = 10


class AddressInputError(ValueError):
    """A bad address given on the command line."""


def normalize_address(text: str) -> str:
    """`User@Example.JP` → `user@example.jp`; raises AddressInputError for anything else."""
    text = text.strip()
    try:
        addr = parse_path(f"<{text}>", smtputf8=True)
    except AddressError:
        raise AddressInputError(f"{text!r} is not a valid email address") from None
    if addr is None or not addr.domain or addr.routing_trick or addr.domain.startswith("["):
        raise AddressInputError(f"{text!r} is not a plain user@domain address")
    if "/" in addr.local:
        # The local part names a Maildir directory; "/" would nest or escape it.
        raise AddressInputError(f"{text!r}: '/' is not allowed in a local part here")
    return addr.key


@dataclass
class Resolution:
    """Where one recipient's mail goes: local mailboxes and/or remote forwards."""

    mailboxes: list[str] = field(default_factory=list)
    forwards: list[str] = field(default_factory=list)


class Directory:
    def __init__(self, store: Store, local_domains: tuple[str, ...], postmaster: str,
                 report_address: str = "dmarc-reports"):
        self.store = store
        self.local_domains = frozenset(local_domains)
        self.postmaster = postmaster
        self.report_address = report_address  # [mailauth] report_address: a local part at every local domain

    def is_local(self, domain: str) -> bool:
        return domain in self.local_domains

    async def lookup(self, address: Address) -> Resolution | None:
        """`resolve` off the event loop (StoreBusy when state.db cannot answer now)."""
        return await self.store.run(self.resolve, address)

    def resolve(self, address: Address) -> Resolution | None:
        """The mailboxes a local recipient reaches, or None when nobody by that name lives here."""
        key = address.key if address.domain else self.postmaster  # bare <postmaster>
        out = Resolution()
        if not self._expand(key, out, 0, set()):
            return None
        out.mailboxes = list(dict.fromkeys(out.mailboxes))
        out.forwards = list(dict.fromkeys(out.forwards))
        return out

    def _expand(self, key: str, out: Resolution, depth: int, seen: set[str]) -> bool:
        if depth > MAX_ALIAS_DEPTH or key in seen:
            return False
        seen.add(key)
        local, _, domain = key.rpartition("@")
        if domain not in self.local_domains:
            out.forwards.append(key)
            return True
        candidates = [key]
        if "+" in local and local.split("+", 1)[0]:
            candidates.append(f"{local.split('+', 1)[0]}@{domain}")
        for cand in candidates:
            if self.store.account_exists(cand):
                out.mailboxes.append(cand)
                return True
            targets = self.store.alias_targets(cand)
            if targets:
                found = False
                for t in targets:
                    found = self._expand(t, out, depth + 1, seen) or found
                return found
        if local.split("+", 1)[0] in ("postmaster", self.report_address) and key != self.postmaster:
            # RFC 5321 4.5.1: postmaster@ every local domain must work. The DMARC report address
            # too (it is published in rua=): its reports are parsed, and the mail kept for postmaster.
            return self._expand(self.postmaster, out, depth + 1, seen)
        if key == self.postmaster:
            # No account or alias holds the postmaster address yet: its mail still must not
            # bounce. It waits in that address's Maildir; `account add` for it gives access.
            out.mailboxes.append(key)
            return True
        return False
