import os
import signal
import sys

import lrproxy

# A worker (its supervisor starts it as `python -m lrproxy serve`, with its listening
# sockets, already queueing connections) notes a SIGTERM that comes while it starts,
# before its event loop's handler is there: the default action would end it at once and
# its queued connections would be reset as the socket closes. Noted, the worker drains
# as soon as it serves, which answers them (cli._serve).
if os.environ.get("LRPROXY_WORKER_FDS") is not None:  # (workers.WORKER_FDS_ENV)
    signal.signal(signal.SIGTERM, lambda signum, frame: lrproxy.TERM_EARLY.append(signum))

from lrproxy.cli import main  # (after the handler: these imports take a while)

sys.exit(main())
