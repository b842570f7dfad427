"""``twistd -n xenpool-pu``: the pool user keeper.

Only the command line exists so far; the service arrives with issue 5, so starting
it stops at once with a message saying so.
"""

from twisted.python import usage


class Options(usage.Options):
    optParameters = [["config", "c", None, "config file (etc/xenpool/*.conf)"]]


def makeService(options: Options):
    raise SystemExit("xenpool-pu: the pool user keeper is not implemented yet (issue 5)")
