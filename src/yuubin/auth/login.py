"""One login exchange of a session: SASL steps, then the password check through the guard.

The same for every protocol that takes a password (SMTP AUTH now, IMAP AUTHENTICATE and POP3
AUTH next): the protocol core frames the exchange, this decides it, the guard counts failures.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from yuubin.auth import sasl
from yuubin.auth.guard import AuthGuard, LoginResult

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class Malformed:
    """The exchange broke the mechanism's syntax (a protocol error, not a wrong password)."""

    reason: str


LoginStep = sasl.Challenge | Malformed | LoginResult


class LoginExchange:
    def __init__(self, guard: AuthGuard, client: IPAddress, session: str):
        self.guard = guard
        self.client = client
        self.session = session
        self._mechanism: sasl.PlainServer | sasl.LoginServer | None = None

    async def start(self, mechanism: str, initial: str | None) -> LoginStep:
        """AUTH with `mechanism` (one the core offered) and its optional initial response."""
        self._mechanism = sasl.server_for(mechanism)
        try:
            return await self._step(sasl.decode_initial(initial))
        except sasl.SaslError as e:
            self._mechanism = None
            return Malformed(str(e))

    async def respond(self, data: bytes) -> LoginStep:
        """The client's (decoded) answer to the last challenge."""
        if self._mechanism is None:
            return Malformed("no authentication exchange in progress")
        try:
            return await self._step(data)
        except sasl.SaslError as e:
            self._mechanism = None
            return Malformed(str(e))

    async def _step(self, response: bytes | None) -> LoginStep:
        assert self._mechanism is not None
        step = self._mechanism.step(response)
        if isinstance(step, sasl.Challenge):
            return step
        self._mechanism = None
        return await self.guard.login(self.client, step.username, step.password, self.session, step.authzid)
