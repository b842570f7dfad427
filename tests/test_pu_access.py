"""Who may ask a PE (--pu-access): PU proofs, TLS names and VM patterns, on a Clock."""

from __future__ import annotations

import dataclasses

import pytest
from twisted.internet import defer
from twisted.python import usage

from xenpool.asap_client import PuCredential
from xenpool.pe.access import PuAccess, PuRule, read_access
from xenpool.protocol import messages as M
from xenpool.protocol import session as S

from .helpers import Session

KEEPER_SECRET = b"the keeper's own secret, 32 bytes"
NOW = 1_800_000_000.0
RULES = [
    PuRule("keeper", KEEPER_SECRET, ("web*",)),
    PuRule("tls-only", None, ("db1",)),
]


@pytest.fixture
def guarded(pe, clock):
    clock.advance(NOW)
    pe.access = PuAccess(RULES, clock)
    return pe


def proven(pe, clock, message, session=None, name="keeper", secret=KEEPER_SECRET):
    session = session or Session()
    pe.handle(PuCredential(name, secret, clock).proof(message), session)
    pe.handle(message, session)
    return session


def codes(session):
    return [
        m.code for m in session.sent if isinstance(m, S.CreateResult | S.StopResult)
    ]


def test_a_proven_pu_creates_and_stops_its_vm(guarded, clock):
    request = S.CreateServer("web1", "", (), 300)
    session = proven(guarded, clock, request)
    assert codes(session) == [S.ResultCode.STARTED]
    assert "web1" in guarded.hypervisor.domains
    proven(guarded, clock, S.StopServer("web1"), session)
    assert codes(session)[-1] == S.ResultCode.NORMAL_END
    assert "web1" not in guarded.hypervisor.domains


@pytest.mark.parametrize(
    "name,secret,why",
    [
        (None, None, "did not prove"),
        ("keeper", b"a wrong secret of enough length", "is wrong"),
        ("stranger", KEEPER_SECRET, "no secret at this PE"),
        ("tls-only", KEEPER_SECRET, "no secret at this PE"),
    ],
)
def test_an_unproven_create_is_refused_and_nothing_starts(
    guarded, clock, name, secret, why
):
    request = S.CreateServer("web1", "", (), 300)
    if name is None:
        session = Session()
        guarded.handle(request, session)
    else:
        session = proven(guarded, clock, request, name=name, secret=secret)
    assert codes(session) == [S.ResultCode.NOT_AUTHORIZED]
    assert why in session.results()[0].reason
    assert session.closed
    assert not guarded.hypervisor.domains
    assert not [m for m in session.sent if isinstance(m, M.Cookie)]  # no cookie read
    assert guarded.describe()["refusals"]


def test_a_proof_is_for_one_request_once_and_a_minute(guarded, clock):
    request = S.CreateServer("web1", "", (), 300)
    proof = PuCredential("keeper", KEEPER_SECRET, clock).proof(request)
    other = Session()
    guarded.handle(proof, other)  # a proof for web1 does not prove web2
    guarded.handle(S.CreateServer("web2", "", (), 300), other)
    assert codes(other) == [S.ResultCode.NOT_AUTHORIZED]
    first = Session()
    guarded.handle(proof, first)
    guarded.handle(request, first)
    assert codes(first) == [S.ResultCode.STARTED]
    replay = Session()
    guarded.handle(proof, replay)
    guarded.handle(request, replay)
    assert codes(replay) == [S.ResultCode.NOT_AUTHORIZED]
    assert "replay" in replay.results()[0].reason
    late = PuCredential("keeper", KEEPER_SECRET, clock).proof(S.StopServer("web1"))
    clock.advance(61)
    guarded.handle(late, first)
    guarded.handle(S.StopServer("web1"), first)
    assert codes(first)[-1] == S.ResultCode.NOT_AUTHORIZED
    assert "web1" in guarded.hypervisor.domains  # not stopped


def test_a_pu_manages_only_its_vms(guarded, clock):
    session = proven(guarded, clock, S.CreateServer("db1", "", (), 300))
    assert codes(session) == [S.ResultCode.NOT_AUTHORIZED]
    assert "may not manage db1" in session.results()[0].reason
    assert not guarded.hypervisor.domains


def test_a_tls_certificate_names_the_pu(guarded, clock):
    session = Session()
    session.tls_name = "tls-only"
    guarded.handle(S.CreateServer("db1", "", (), 300), session)
    assert codes(session) == [S.ResultCode.STARTED]
    stranger = Session()
    stranger.tls_name = "host9"  # a certificate the CA signed, of no PU known here
    guarded.handle(S.CreateServer("db2", "", (), 300), stranger)
    assert codes(stranger) == [S.ResultCode.NOT_AUTHORIZED]


def test_adopting_needs_a_proof_and_the_vm(guarded, clock):
    session = proven(guarded, clock, S.CreateServer("web1", "", (), 300))
    cookie = [m for m in session.sent if isinstance(m, M.Cookie)][-1].cookie
    guarded.session_lost(session)  # kept for the lease, an orphan
    echo = M.CookieEcho(cookie)
    thief = Session()
    guarded.handle(echo, thief)
    assert codes(thief) == [S.ResultCode.NOT_AUTHORIZED]
    assert not [m for m in thief.sent if isinstance(m, M.Cookie)]
    wrong = Session()
    wrong.tls_name = "tls-only"  # known, but web1 is not its VM
    guarded.handle(echo, wrong)
    assert codes(wrong) == [S.ResultCode.NOT_AUTHORIZED]
    owner = proven(guarded, clock, echo)
    assert codes(owner) == [S.ResultCode.STARTED]
    assert "web1" in guarded.hypervisor.domains


def test_a_stop_on_a_session_without_proof_is_refused(guarded, clock):
    session = proven(guarded, clock, S.CreateServer("web1", "", (), 300))
    guarded.handle(S.StopServer("web1"), session)
    assert codes(session)[-1] == S.ResultCode.NOT_AUTHORIZED
    assert not session.closed
    assert "web1" in guarded.hypervisor.domains


def test_moves_need_the_pool_secret_while_access_is_on(guarded, clock):
    proven(guarded, clock, S.CreateServer("web1", "", (), 300))
    guarded.settings = dataclasses.replace(guarded.settings, secret=b"")
    answer = defer.Deferred.fromCoroutine(
        guarded.move_on_request(S.MoveRequest(9, "web1", 8, b"", None, 0))
    )
    assert answer.result.code == S.ResultCode.NOT_AUTHORIZED
    assert "web1" in guarded.hypervisor.domains


def test_read_access(tmp_path):
    (tmp_path / "keeper.secret").write_bytes(KEEPER_SECRET + b"\n")
    path = tmp_path / "access.conf"
    path.write_text(
        "[pu keeper]\nsecret-file = keeper.secret\nvms = web* db?\n\n[pu ops]\nvms = *\n"
    )
    assert read_access(str(path)) == [
        PuRule("keeper", KEEPER_SECRET, ("web*", "db?")),
        PuRule("ops", None, ("*",)),
    ]
    path.write_text("[pu keeper]\nsecret = inline\n")
    with pytest.raises(usage.UsageError, match="unknown key 'secret'"):
        read_access(str(path))
    path.write_text("[pu keeper]\nsecret-file = missing\n")
    with pytest.raises(usage.UsageError, match="cannot read"):
        read_access(str(path))


def test_pu_proof_round_trip():
    proof = S.PuProof("keeper", 123, 456, b"\x01" * 32)
    assert S.decode(S.encode(proof)) == proof
