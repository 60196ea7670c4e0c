"""`python -m lrproxy` and the `lrproxy` command: the signals a process must not die of
while it starts are caught here, before the imports that take most of a second."""

import os
import signal
import sys
import time

import lrproxy


def _term_early(signum: int, frame: object) -> None:
    lrproxy.TERM_EARLY.append(time.monotonic())
    signal.alarm(lrproxy.TERM_START_S)


def _hup_early(signum: int, frame: object) -> None:
    lrproxy.HUP_EARLY.append(time.monotonic())


def main() -> int:
    # A worker (its supervisor starts it as `python -m lrproxy serve`, with its listening
    # sockets, already queueing connections) notes a SIGTERM that comes while it starts,
    # before its event loop's handler is there: the default action would end it at once
    # and its queued connections would be reset as the socket closes. Noted, the worker
    # drains as soon as it serves, which answers them (cli._serve).
    # A worker stuck in its start (a hung mount) must not outlive the stop, nor its
    # supervisor (PR_SET_PDEATHSIG) with the port: SIGALRM, at its default, ends it
    # TERM_START_S after the SIGTERM unless cli._serve, serving, has cancelled the alarm.
    if os.environ.get(lrproxy.WORKER_FDS_ENV) is not None:
        signal.signal(signal.SIGTERM, _term_early)
    # A SIGHUP while `serve` starts (a config tool's `kill -HUP`, a logrotate hook) would
    # end it without a word: noted, it is a reload once it serves (cli, workers).
    if "serve" in sys.argv[1:]:
        signal.signal(signal.SIGHUP, _hup_early)
    from lrproxy.cli import main as cli_main  # (after the handlers: these take a while)

    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
