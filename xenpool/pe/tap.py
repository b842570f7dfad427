"""``twistd -n xenpool-pe``: the pool element.

Only the command line exists so far; the service arrives with issue 4, so starting
it stops at once with a message saying so.
"""

from twisted.python import usage


class Options(usage.Options):
    optParameters = [["config", "c", None, "config file (etc/xenpool/*.conf)"]]


def makeService(options: Options):
    raise SystemExit("xenpool-pe: the pool element is not implemented yet (issue 4)")
