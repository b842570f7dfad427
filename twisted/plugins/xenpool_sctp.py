"""Twisted endpoint strings ``sctp:...`` (xenpool.sctp), for serverFromString and
clientFromString, so every option that takes ``tcp:`` takes ``sctp:`` too. Nothing is
imported until an ``sctp:`` string is parsed."""

from twisted.internet.interfaces import (
    IStreamClientEndpointStringParserWithReactor,
    IStreamServerEndpointStringParser,
)
from twisted.plugin import IPlugin
from zope.interface import implementer


@implementer(IPlugin, IStreamServerEndpointStringParser)
class _SctpServerParser:
    prefix = "sctp"

    def parseStreamServer(self, reactor, *args, **kwargs):
        from xenpool.sctp import server_endpoint

        return server_endpoint(reactor, *args, **kwargs)


@implementer(IPlugin, IStreamClientEndpointStringParserWithReactor)
class _SctpClientParser:
    prefix = "sctp"

    def parseStreamClient(self, reactor, *args, **kwargs):
        from xenpool.sctp import client_endpoint

        return client_endpoint(reactor, *args, **kwargs)


sctpServerParser = _SctpServerParser()
sctpClientParser = _SctpClientParser()
