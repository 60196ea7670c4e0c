"""systemd integration (SPEC §6): sd_notify datagrams and socket activation.

sd_notify is a datagram protocol of a few lines (sd_notify(3)): `KEY=VALUE` lines sent
to the AF_UNIX socket named by `$NOTIFY_SOCKET` (`@` at the start means the abstract
namespace). Without the variable every call does nothing, so the same code runs under
systemd, in a terminal and in tests.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
from collections.abc import Mapping
from typing import Final

from lrproxy.log import MAIN, Seldom

SD_LISTEN_FDS_START: Final = 3
log = logging.getLogger(MAIN)


class Notifier:
    """Sends READY=1, RELOADING=1, STOPPING=1, WATCHDOG=1 when systemd asked for them."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        addr = environ.get("NOTIFY_SOCKET", "")
        self._addr: str | bytes | None = None
        if addr.startswith("@"):
            self._addr = b"\0" + addr[1:].encode()
        elif addr.startswith("/"):
            self._addr = addr
        self._sock: socket.socket | None = None
        self._failed = Seldom(60.0)  # its warning, once a minute at most
        self.ready_status = ""  # a worker names itself here for its supervisor
        usec = environ.get("WATCHDOG_USEC", "")
        pid = environ.get("WATCHDOG_PID", "")
        self.watchdog_s: float | None = None
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_s = int(usec) / 1e6 / 2  # ping at half the interval (sd_watchdog_enabled(3))

    @property
    def enabled(self) -> bool:
        return self._addr is not None

    def send(self, *lines: str) -> None:
        if self._addr is None:
            return
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto("\n".join(lines).encode(), self._addr)
        except OSError as e:  # systemd gone or socket full: never fatal for serving
            if self._failed.due():  # (WATCHDOG=1 goes every few seconds)
                log.warning("sd_notify failed: %s", e.strerror)

    def ready(self, status: str = "") -> None:
        status = self.ready_status or status
        self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def reloading(self) -> None:
        # MONOTONIC_USEC lets Type=notify-reload match this to its SIGHUP (sd_notify(3)).
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self) -> None:
        self.send("STOPPING=1")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def activated_sockets(environ: Mapping[str, str]) -> list[socket.socket]:
    """Listening sockets passed by systemd socket activation (sd_listen_fds(3)), if any."""
    if environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    try:
        n = int(environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return []
    socks = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + n):
        os.set_inheritable(fd, False)
        socks.append(socket.socket(fileno=fd))
    return socks


def ignore_hangups(loop: asyncio.AbstractEventLoop) -> None:
    """Stopping: a SIGHUP (a reload sent by a script, or by `systemctl reload`, as the
    service stops) reloads nothing now. Its handler is swapped for one that does
    nothing, never through the default action, which would end the process with status
    129; `serve` ignores SIGHUP once its loop has closed (and restored that default)."""
    loop.add_signal_handler(signal.SIGHUP, _no_reload)


def ignore_user_signals(loop: asyncio.AbstractEventLoop) -> None:
    """SIGUSR1 and SIGUSR2 mean nothing to lrproxy, whose logs go to stdout and stderr
    (no file to reopen): ignored with a warning, not their default action, which ends
    the process at once, mid-request, with no drain. nginx reopens its log files on
    SIGUSR1, and a logrotate postrotate copied from it sends one."""
    for sig in (signal.SIGUSR1, signal.SIGUSR2):
        loop.add_signal_handler(sig, _user_signal, sig)


def _user_signal(sig: signal.Signals) -> None:
    log.warning("%s ignored: lrproxy logs to stdout and stderr, it has no log file to "
                "reopen, and no other use for the signal", sig.name)


def _no_reload() -> None:
    log.debug("SIGHUP ignored: stopping")
