"""`twistd`, as the console script runs it, plus saving coverage data at shutdown.

twistd ends a daemon stopped by SIGTERM by re-raising the signal, so coverage's atexit
hook never runs; this saves the data when the reactor shuts down. Without coverage it
is exactly `twistd`.
"""

import sys

from twisted.scripts.twistd import run

try:
    import coverage

    current = coverage.Coverage.current()
except ImportError:  # pragma: no cover
    current = None

if current is not None:
    from twisted.internet import reactor

    def save() -> None:
        current.stop()
        current.save()

    reactor.addSystemEventTrigger("after", "shutdown", save)

sys.exit(run())
