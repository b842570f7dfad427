"""The PE's questions to other PEs and to the voters, on a Clock: a host whose packets are
dropped costs the question's own timeout (not TCP's connect timeout), and a host the pool
no longer lists is still asked at the address the pool last gave for it."""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.task import Clock

from xenpool.pe.service import TcpClaimAsker, TcpVoter, ask_pe
from xenpool.protocol import params as P
from xenpool.protocol import session as S


def element(identifier: int) -> P.PoolElement:
    return P.PoolElement(
        identifier,
        1,
        60_000,
        P.TcpTransport(5000 + identifier, (f"10.0.0.{identifier}",)),
        P.PoolPolicy.make(P.PolicyType.LEAST_USED),
    )


class Channel:
    def __init__(self, answer=None, deliver=None) -> None:
        self.sent, self.closed, self.answer, self.deliver = [], False, answer, deliver

    def send(self, message) -> None:
        self.sent.append(message)
        if self.answer is not None:
            self.deliver(self.answer(message))

    def close(self) -> None:
        self.closed = True


class Access:
    """Connections that answer, and hosts whose packets are dropped (the connect never
    completes until cancelled)."""

    def __init__(self, pool: list[int]) -> None:
        self.pool = pool
        self.dropped: set[int] = set()
        self.cancelled: list[int] = []
        self.asked: list[int] = []

    def resolve(self, pool_handle, items, ram_mb=None):
        return defer.succeed([element(i) for i in self.pool])

    def connect(self, element, deliver):
        self.asked.append(element.identifier)
        if element.identifier in self.dropped:
            return defer.Deferred(lambda d: self.cancelled.append(element.identifier))

        def answer(query):
            return S.ClaimAnswer(element.identifier, f"host{element.identifier}", "")

        return defer.succeed(Channel(answer, deliver))


def test_a_dropped_host_costs_the_questions_timeout_not_tcps():
    clock, access = Clock(), Access([1])
    access.dropped.add(1)
    result = defer.ensureDeferred(
        ask_pe(
            clock,
            access,
            element(1),
            S.ClaimQuery(2, "web1", "", ()),
            S.ClaimAnswer,
            0.5,
            "claim query",
        )
    )
    assert not result.called
    clock.advance(0.5)
    assert result.called and result.result is None and access.cancelled == [1]


def test_a_host_the_pool_dropped_is_still_asked_at_its_last_address():
    clock, access = Clock(), Access([1, 3])
    asker = TcpClaimAsker(clock, access, b"Xen", pe_identifier=2)
    answers = asker.ask(S.ClaimQuery(2, "web1", "", ())).result
    assert sorted(a.host for a in answers) == ["host1", "host3"]
    access.pool = [1]  # host3 removed from the pool (a PU reported it unreachable)
    access.asked.clear()
    answers = asker.ask(S.ClaimQuery(2, "web1", "", ()), also=frozenset({3})).result
    assert sorted(access.asked) == [1, 3] and sorted(a.host for a in answers) == [
        "host1",
        "host3",
    ]
    access.asked.clear()
    assert asker.ask(S.ClaimQuery(2, "web1", "", ())).called  # not a suspect: not asked
    assert access.asked == [1]


class Endpoint:
    def __init__(self) -> None:
        self.cancelled = 0

    def connect(self, factory):
        return defer.Deferred(lambda d: setattr(self, "cancelled", self.cancelled + 1))


def test_a_voter_whose_packets_are_dropped_gives_no_answer_after_its_timeout():
    clock, endpoint = Clock(), Endpoint()
    voter = TcpVoter(clock, endpoint, timeout_s=1.0)
    request = S.LeaseRequest(b"Xen", 1, "host1", S.LeaseAction.ACQUIRE, 15_000, "web1")
    answers = voter.ask([request, request])
    clock.advance(0.9)
    assert not answers.called
    clock.advance(0.1)
    assert answers.result == [None, None] and endpoint.cancelled == 1
