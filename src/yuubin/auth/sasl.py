"""SASL server mechanisms PLAIN (RFC 4616) and LOGIN (draft-murchison-sasl-login), sans-IO.

A mechanism is fed the client's responses (already base64-decoded) and answers with the next
challenge or with the credentials to check. Checking them is not its business (see authguard).

SCRAM-SHA-256 is not offered: it needs a salted PBKDF2-SHA-256 key stored per account, which a
stolen state.db lets an attacker test guesses against far faster than Argon2id. Offering it would
weaken every account's storage, so yuubin takes passwords only over TLS (PLAIN/LOGIN) instead.
"""

from __future__ import annotations

import binascii
from dataclasses import dataclass

MECHANISMS = ("PLAIN", "LOGIN")


class SaslError(Exception):
    """The exchange is malformed (501), not a wrong password."""


@dataclass(frozen=True, slots=True)
class Credentials:
    authzid: str
    username: str
    password: str


@dataclass(frozen=True, slots=True)
class Challenge:
    data: bytes


def decode_initial(initial: str | None) -> bytes | None:
    """The AUTH command's initial response: None when absent, b"" for `=` (RFC 4954 4)."""
    if initial is None:
        return None
    if initial == "=":
        return b""
    try:
        return binascii.a2b_base64(initial.encode("ascii"), strict_mode=True)
    except (binascii.Error, UnicodeEncodeError):
        raise SaslError("initial response is not base64") from None


def _text(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise SaslError(f"{what} is not UTF-8") from None


class PlainServer:
    def step(self, response: bytes | None) -> Challenge | Credentials:
        if response is None:
            return Challenge(b"")
        parts = response.split(b"\0")
        if len(parts) != 3 or not parts[1]:
            raise SaslError("PLAIN response must be authzid NUL authcid NUL password")
        return Credentials(_text(parts[0], "authzid"), _text(parts[1], "username"), _text(parts[2], "password"))


class LoginServer:
    def __init__(self) -> None:
        self._username: str | None = None

    def step(self, response: bytes | None) -> Challenge | Credentials:
        if self._username is None:
            if response is None:
                return Challenge(b"Username:")
            if not response:
                raise SaslError("empty username")
            self._username = _text(response, "username")
            return Challenge(b"Password:")
        if response is None:
            raise SaslError("password missing")
        return Credentials("", self._username, _text(response, "password"))


def server_for(mechanism: str) -> PlainServer | LoginServer:
    if mechanism == "PLAIN":
        return PlainServer()
    if mechanism == "LOGIN":
        return LoginServer()
    raise ValueError(mechanism)
