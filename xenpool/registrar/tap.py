"""``twistd -n xenpool-registrar``: the pool registrar.

Only the command line exists so far; the service arrives with issue 3, so starting
it stops at once with a message saying so.
"""

from twisted.python import usage


class Options(usage.Options):
    optParameters = [["config", "c", None, "config file (etc/xenpool/*.conf)"]]


def makeService(options: Options):
    raise SystemExit("xenpool-registrar: the pool registrar is not implemented yet (issue 3)")
