"""The HTTP status endpoint every daemon serves (``--status``): JSON documents and Prometheus metrics.

One resource for the registrar and the PE: each names its JSON documents (the registrar
``/handlespace``, the PE ``/status``), each a callable giving a dict or a Deferred firing
one, and hands over its Prometheus registry for ``/metrics``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    disable_created_metrics,
    generate_latest,
)
from twisted.internet import defer
from twisted.logger import Logger
from twisted.web import resource, server

log = Logger()

#: Prometheus' text exposition format.
METRICS_CONTENT_TYPE = b"text/plain; version=0.0.4"


def _json(document: Mapping[str, Any]) -> bytes:
    return json.dumps(document, indent=1).encode()


class JsonDocument(resource.Resource):
    """``GET``: ``document()`` as JSON; it may answer a dict or a Deferred firing one."""

    isLeaf = True

    def __init__(self, document: Callable[[], Any]) -> None:
        super().__init__()
        self.document = document

    def render_GET(self, request: server.Request) -> bytes | int:
        request.setHeader(b"content-type", b"application/json")
        result = self.document()
        if not isinstance(result, defer.Deferred):
            return _json(result)

        gone: list = []
        request.notifyFinish().addErrback(
            gone.append
        )  # the client left before the answer

        def write(document) -> None:
            if not gone:
                request.write(_json(document))
                request.finish()

        def failed(failure) -> None:
            log.failure("status document failed", failure)
            if not gone:
                request.setResponseCode(500)
                request.finish()

        result.addCallback(write).addErrback(failed)
        return server.NOT_DONE_YET


class Metrics(resource.Resource):
    """``GET``: the registry's metrics in Prometheus' text format."""

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self.registry = registry
        # no <counter>_created gauges next to each counter (Prometheus' conventions)
        disable_created_metrics()

    def render_GET(self, request) -> bytes:
        request.setHeader(b"content-type", METRICS_CONTENT_TYPE)
        return generate_latest(self.registry)


class StatusResource(resource.Resource):
    """The root of a daemon's status site: ``/NAME`` per JSON document, and ``/metrics``."""

    def __init__(
        self, documents: Mapping[bytes, Callable[[], Any]], registry: CollectorRegistry
    ) -> None:
        super().__init__()
        for name, document in documents.items():
            self.putChild(name, JsonDocument(document))
        self.putChild(b"metrics", Metrics(registry))
