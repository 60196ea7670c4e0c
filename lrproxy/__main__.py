import os
import signal
import sys
import time

import lrproxy

# A worker (its supervisor starts it as `python -m lrproxy serve`, with its listening
# sockets, already queueing connections) notes a SIGTERM that comes while it starts,
# before its event loop's handler is there: the default action would end it at once and
# its queued connections would be reset as the socket closes. Noted, the worker drains
# as soon as it serves, which answers them (cli._serve).
# A worker stuck in its start (a hung mount) must not outlive the stop, nor its
# supervisor (PR_SET_PDEATHSIG) with the port: SIGALRM, at its default, ends it
# TERM_START_S after the SIGTERM unless cli._serve, serving, has cancelled the alarm.
if os.environ.get(lrproxy.WORKER_FDS_ENV) is not None:

    def _term_early(signum: int, frame: object) -> None:
        lrproxy.TERM_EARLY.append(time.monotonic())
        signal.alarm(lrproxy.TERM_START_S)

    signal.signal(signal.SIGTERM, _term_early)

from lrproxy.cli import main  # (after the handler: these imports take a while)

sys.exit(main())
