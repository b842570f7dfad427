"""The status site both daemons serve: JSON documents (plain or Deferred) and /metrics."""

from __future__ import annotations

import json

from prometheus_client import CollectorRegistry, Counter
from twisted.internet import defer
from twisted.web import server
from twisted.web.test.requesthelper import DummyRequest

from xenpool.status import StatusResource


def get(root: StatusResource, name: bytes) -> tuple[DummyRequest, bytes]:
    request = DummyRequest([name])
    child = root.getChildWithDefault(name, request)
    body = child.render(request)
    if body != server.NOT_DONE_YET:
        request.write(body)
        request.finish()
    return request, b"".join(request.written)


def test_a_document_is_json_whether_plain_or_deferred():
    later: defer.Deferred = defer.Deferred()
    root = StatusResource(
        {b"now": lambda: {"a": 1}, b"later": lambda: later}, CollectorRegistry()
    )
    request, body = get(root, b"now")
    assert json.loads(body) == {"a": 1}
    assert request.responseHeaders.getRawHeaders(b"content-type") == [
        b"application/json"
    ]
    request, body = get(root, b"later")
    assert request.finished == 0
    later.callback({"b": [2]})
    assert request.finished and json.loads(b"".join(request.written)) == {"b": [2]}


def test_a_failed_document_answers_500():
    root = StatusResource(
        {b"broken": lambda: defer.fail(RuntimeError("no"))}, CollectorRegistry()
    )
    request, body = get(root, b"broken")
    assert request.finished and request.responseCode == 500


def test_metrics_come_from_the_registry():
    registry = CollectorRegistry()
    Counter("xenpool_test_things", "Things", registry=registry).inc(3)
    request, body = get(StatusResource({}, registry), b"metrics")
    assert b"xenpool_test_things_total 3.0" in body
    assert request.responseHeaders.getRawHeaders(b"content-type") == [
        b"text/plain; version=0.0.4"
    ]


def test_a_client_gone_before_a_slow_document_is_not_answered():
    """A poller that gave up (its timeout) must not make the daemon finish a dead request
    (Twisted raises, and the daemon logged a critical 'status document failed')."""
    from twisted.internet.error import ConnectionLost
    from twisted.python.failure import Failure

    later: defer.Deferred = defer.Deferred()
    root = StatusResource({b"later": lambda: later}, CollectorRegistry())
    request, _ = get(root, b"later")
    request.processingFailed(
        Failure(ConnectionLost())
    )  # what a dropped connection does to it
    later.callback({"b": 1})
    assert request.written == [] and request.finished == 0
