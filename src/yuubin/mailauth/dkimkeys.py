"""The DKIM signing keys on disk: where they live, how they are made, which ones sign.

Layout (one directory per domain, one key pair per key set)::

    data_dir/dkim/                            0700
    data_dir/dkim/<domain>/                   0700
    data_dir/dkim/<domain>/<set>-rsa.key      0600  RSA 2048, PEM (PKCS#8)
    data_dir/dkim/<domain>/<set>-ed25519.key  0600  Ed25519, PEM (PKCS#8)

A key set ``<set>`` (``y2026a`` by default) is one rotation step. Its two keys are published
under two DNS selectors, ``<set>-rsa`` and ``<set>-ed25519``, because one selector name holds one
key record. The file name without ``.key`` is the selector. The set that signs is the newest one
(by creation time), unless ``[dkim] selectors`` names the sets to use: that is how a new set is
published in DNS before it is used. PEM PKCS#8 keeps the files readable by openssl and others.
"""

from __future__ import annotations

import base64
import os
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from yuubin.durable import fsync_dir

__all__ = ["ALGORITHMS", "RSA_BITS", "DkimKey", "KeySet", "active_set", "dkim_dir", "generate", "key_sets",
           "next_set_name"]

RSA_BITS = 2048
ALGORITHMS = ("rsa", "ed25519")  # every set has one key of each, signed with in this order
_SET_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,40}[a-z0-9])?$")


@dataclass(frozen=True, slots=True)
class DkimKey:
    """One private key file, and what DNS must say about it."""

    domain: str
    key_set: str
    algorithm: str  # "rsa" or "ed25519"
    path: Path

    @property
    def selector(self) -> str:
        return f"{self.key_set}-{self.algorithm}"

    @property
    def dns_name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"

    @property
    def signature_algorithm(self) -> bytes:
        return b"rsa-sha256" if self.algorithm == "rsa" else b"ed25519-sha256"

    def _private(self) -> rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey:
        key = serialization.load_pem_private_key(self.path.read_bytes(), password=None)
        if self.algorithm == "rsa" and isinstance(key, rsa.RSAPrivateKey):
            return key
        if self.algorithm == "ed25519" and isinstance(key, ed25519.Ed25519PrivateKey):
            return key
        raise ValueError(f"{self.path}: not an {self.algorithm} private key")

    def signing_key(self) -> bytes:
        """The private key the way dkimpy takes it: PEM for RSA, the base64 seed for Ed25519."""
        key = self._private()
        if isinstance(key, rsa.RSAPrivateKey):
            return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                     serialization.NoEncryption())
        return base64.b64encode(key.private_bytes_raw())

    def public_value(self) -> str:
        """The p= value: SubjectPublicKeyInfo DER for RSA (RFC 6376), the raw 32 bytes for Ed25519 (RFC 8463)."""
        key = self._private()
        if isinstance(key, rsa.RSAPrivateKey):
            der = key.public_key().public_bytes(serialization.Encoding.DER,
                                                serialization.PublicFormat.SubjectPublicKeyInfo)
            return base64.b64encode(der).decode()
        return base64.b64encode(key.public_key().public_bytes_raw()).decode()

    def txt_record(self) -> str:
        """The TXT record to publish at ``dns_name``."""
        return f"v=DKIM1; k={self.algorithm}; p={self.public_value()}"


@dataclass(frozen=True, slots=True)
class KeySet:
    """The keys of one set of one domain (both algorithms when complete) and when it was made."""

    domain: str
    name: str
    keys: tuple[DkimKey, ...]
    created: float  # mtime of its oldest key file

    @property
    def complete(self) -> bool:
        return {k.algorithm for k in self.keys} == set(ALGORITHMS)


def dkim_dir(data_dir: Path) -> Path:
    return data_dir / "dkim"


def key_sets(data_dir: Path, domain: str) -> list[KeySet]:
    """The key sets of ``domain`` on disk, oldest first (by creation, then name)."""
    directory = dkim_dir(data_dir) / domain.lower()
    found: dict[str, list[DkimKey]] = {}
    created: dict[str, float] = {}
    try:
        entries = sorted(directory.iterdir())
    except FileNotFoundError:
        return []
    for path in entries:
        name = path.name
        if not name.endswith(".key"):
            continue
        stem = name[: -len(".key")]
        set_name, _, algorithm = stem.rpartition("-")
        if algorithm not in ALGORITHMS or not _SET_NAME.match(set_name):
            continue
        found.setdefault(set_name, []).append(DkimKey(domain.lower(), set_name, algorithm, path))
        mtime = path.stat().st_mtime
        created[set_name] = min(created.get(set_name, mtime), mtime)
    sets = [KeySet(domain.lower(), n, tuple(sorted(keys, key=lambda k: ALGORITHMS.index(k.algorithm))), created[n])
            for n, keys in found.items()]
    return sorted(sets, key=lambda s: (s.created, s.name))


def active_set(data_dir: Path, domain: str, selectors: tuple[str, ...] = ()) -> KeySet | None:
    """The set that signs ``domain``'s mail: the first of ``selectors`` it has, else its newest complete set."""
    sets = [s for s in key_sets(data_dir, domain) if s.complete]
    by_name = {s.name: s for s in sets}
    for wanted in selectors:
        if wanted in by_name:
            return by_name[wanted]
    return sets[-1] if sets else None


def next_set_name(data_dir: Path, domain: str, now: datetime | None = None) -> str:
    """A date-based set name not used yet for ``domain``: y2026a, then y2026b, ..."""
    year = (now or datetime.now(UTC)).year
    taken = {s.name for s in key_sets(data_dir, domain)}
    for letter in "abcdefghijklmnopqrstuvwxyz":
        if f"y{year}{letter}" not in taken:
            return f"y{year}{letter}"
    for n in range(1, 1000):
        if f"y{year}z{n}" not in taken:
            return f"y{year}z{n}"
    raise ValueError(f"no free key set name for {year}")


def check_set_name(name: str) -> str:
    """A set name is a DNS label once "-rsa" is added: lowercase letters, digits, inner hyphens."""
    name = name.strip().lower()
    if not _SET_NAME.match(name):
        raise ValueError(f"{name!r} is not a usable selector (letters, digits and inner hyphens, at most 42)")
    return name


def generate(data_dir: Path, domain: str, set_name: str) -> KeySet:
    """Make both keys of a new set; refuses to overwrite any existing key (FileExistsError)."""
    domain = domain.lower()
    set_name = check_set_name(set_name)
    top = dkim_dir(data_dir)
    for d in (top, top / domain):
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(d, 0o700)
    paths = {alg: top / domain / f"{set_name}-{alg}.key" for alg in ALGORITHMS}
    for path in paths.values():
        if path.exists():
            raise FileExistsError(f"{path}: exists; keys are never overwritten (choose another --selector)")
    pems = {
        "rsa": rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
        "ed25519": ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    }
    for alg, path in paths.items():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.fchmod(fd, 0o600)
            view = memoryview(pems[alg])
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
    fsync_dir(top / domain)
    fsync_dir(top)
    made = [s for s in key_sets(data_dir, domain) if s.name == set_name]
    return made[0]
