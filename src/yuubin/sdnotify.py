"""The systemd notify protocol (sd_notify): READY=1, STOPPING=1, WATCHDOG=1 to $NOTIFY_SOCKET.

Hand-written: the protocol is one datagram to a unix socket, a few lines, and the libraries for
it (python-systemd, sdnotify) would be a dependency for exactly that. The watchdog is pinged
from the event loop itself, so a loop that blocks stops the pings and systemd restarts us
(`WatchdogSec=` in contrib/yuubin.service).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger("yuubin.server")


class ServiceNotifier:
    """Tells the service manager how we are; does nothing when not started by one."""

    def __init__(self, address: str | None, watchdog_interval: float | None = None):
        # An address starting with "@" is in the abstract namespace (a leading NUL byte).
        self.address = "\0" + address[1:] if address and address.startswith("@") else address
        self.watchdog_interval = watchdog_interval  # seconds between pings: half of WATCHDOG_USEC
        self._task: asyncio.Task | None = None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None, pid: int | None = None) -> ServiceNotifier:
        env = os.environ if environ is None else environ
        interval = None
        usec = env.get("WATCHDOG_USEC", "")
        watchdog_pid = env.get("WATCHDOG_PID", "")
        # WATCHDOG_PID names the process the watchdog is meant for; forked workers share the
        # environment: the parent's pid there is ours too (the primary worker pings, see app.py).
        mine = not watchdog_pid or watchdog_pid in (str(os.getpid() if pid is None else pid), str(os.getppid()))
        if usec.isdigit() and int(usec) > 0 and mine:
            interval = int(usec) / 1_000_000 / 2
        return cls(env.get("NOTIFY_SOCKET") or None, interval)

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def send(self, *fields: str) -> bool:
        """One datagram of `KEY=value` lines; False (and a debug line) when it could not be sent."""
        if not self.address:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.sendto("\n".join(fields).encode(), self.address)
        except OSError as e:
            log.debug("event=notify_failed address=%r error=%r", self.address, e)
            return False
        return True

    def ready(self, status: str = "") -> None:
        self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def stopping(self) -> None:
        self.send("STOPPING=1")

    def start_watchdog(self) -> None:
        """Ping WATCHDOG=1 every half WATCHDOG_USEC from the running event loop."""
        if not self.address or not self.watchdog_interval or self._task is not None:
            return
        self._task = asyncio.get_running_loop().create_task(self._ping(self.watchdog_interval))

    async def _ping(self, interval: float) -> None:
        while True:
            self.send("WATCHDOG=1")
            await asyncio.sleep(interval)

    async def stop_watchdog(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
