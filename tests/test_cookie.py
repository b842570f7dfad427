"""The authenticated session cookie: what it carries and what it refuses."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from xenpool.protocol import cookie as C
from xenpool.protocol.errors import Cause, ProtocolError

SECRET = b"pool secret"
NOW = 1_800_000_000.0
STATE = C.SessionState(
    pool_handle=b"Xen",
    server_id="web1",
    disk="nbd://san:10809/web1",
    ips=("10.0.5.1", "fd00::5"),
    ram_mb=300,
    vcpus=2,
    running=True,
    host="pe2.example",
    pe_identifier=0x1234,
    issued_at=NOW - 5,
)


def unseal(data: bytes, **overrides):
    kwargs = dict(secret=SECRET, pool_handle=b"Xen", now=NOW, max_age_s=3600)
    kwargs.update(overrides)
    secret = kwargs.pop("secret")
    return C.unseal(data, secret, **kwargs)


def test_round_trip_keeps_every_field():
    assert unseal(C.seal(STATE, SECRET)) == STATE


@given(
    running=st.booleans(), ram=st.integers(1, 2**32 - 1), issued=st.integers(0, 2**40)
)
def test_round_trip_property(running, ram, issued):
    state = dataclasses.replace(
        STATE, running=running, ram_mb=ram, issued_at=issued / 1000
    )
    assert unseal(C.seal(state, SECRET), now=issued / 1000) == state


def refusal(data: bytes, **overrides) -> str:
    with pytest.raises(C.CookieError) as info:
        unseal(data, **overrides)
    err = info.value
    assert (
        isinstance(err, ProtocolError)
        and err.cause == Cause.SECURITY_REJECTION
        and err.field == "cookie"
    )
    return err.reason


def test_every_altered_byte_is_refused():
    sealed = C.seal(STATE, SECRET)
    for i in range(len(sealed)):
        altered = bytearray(sealed)
        altered[i] ^= 0x01
        assert "bad MAC" in refusal(bytes(altered))


def test_forged_with_another_secret():
    assert "bad MAC" in refusal(C.seal(STATE, b"guessed"))


def test_other_pool_is_refused():
    other = C.seal(dataclasses.replace(STATE, pool_handle=b"Other"), SECRET)
    assert "issued for pool b'Other'" in refusal(other)


def test_stale_and_future_cookies():
    assert "expired" in refusal(C.seal(STATE, SECRET), now=NOW + 3600)
    assert unseal(C.seal(STATE, SECRET), now=NOW + 3600 - 10) == STATE
    future = C.seal(
        dataclasses.replace(STATE, issued_at=NOW + C.CLOCK_SKEW_S + 5), SECRET
    )
    assert "in the future" in refusal(future)


def test_too_short_and_too_long():
    assert "not a xenpool cookie" in refusal(b"x" * 10)
    assert "not a xenpool cookie" in refusal(b"x" * 5000)


def test_sealing_refuses_over_long_fields():
    with pytest.raises(ValueError, match="host longer than 128"):
        C.seal(dataclasses.replace(STATE, host="h" * 129), SECRET)


def test_peek_reads_without_the_secret_but_unseal_still_checks():
    sealed = C.seal(STATE, SECRET)
    assert C.peek(sealed) == STATE
    forged = bytearray(sealed)
    forged[-1] ^= 1
    assert C.peek(bytes(forged)).pe_identifier == STATE.pe_identifier  # routing only
    assert "bad MAC" in refusal(bytes(forged))
