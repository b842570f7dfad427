"""Property tests: whatever bytes a socket delivers, decoders only raise ProtocolError.

And the ``xenpool fuzz`` tool itself: clean, deterministic, and it does report crashes.
"""

from __future__ import annotations

import random
import re
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xenpool import cli
from xenpool.protocol import cookie, framing, messages, session
from xenpool.protocol.errors import Cause, ProtocolError
from xenpool.tools import fuzz


def examples(n: int) -> settings:
    """``n`` examples, or more under a deeper Hypothesis profile (XENPOOL_HYPOTHESIS=long)."""
    return settings(
        max_examples=max(n, settings.default.max_examples),
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


CORPUS = fuzz.corpus()
SINGLE = ("asap", "enrp", "session", "cookie")
STREAMS = ("asap-stream", "enrp-stream", "shim-stream")
assert set(SINGLE + STREAMS) == set(fuzz.DECODERS)

DECODE = {
    "asap": lambda b: messages.decode(b, messages.ASAP_PPID, []),
    "enrp": lambda b: messages.decode(b, messages.ENRP_PPID, []),
    "session": session.decode,
    "cookie": fuzz.unseal,
}
MAKE_STREAM = {
    "asap-stream": lambda size: framing.RSerPoolStream(messages.ASAP_PPID, size),
    "enrp-stream": lambda size: framing.RSerPoolStream(messages.ENRP_PPID, size),
    "shim-stream": lambda size: framing.ShimStream(size),
}


def check_single(decoder: str, data: bytes) -> None:
    """Decode; only a ProtocolError naming a field and an offset in ``data`` may escape."""
    try:
        DECODE[decoder](data)
    except ProtocolError as err:
        assert isinstance(err.field, str) and err.field
        assert 0 <= err.offset <= len(data), err
        assert isinstance(err.cause, Cause)
        assert not err.fatal
    # fuzz_one adds the round trip: an accepted input re-encodes to the same value
    fuzz.fuzz_one(
        decoder, data, answers=False
    )  # answers: see test_error_answers_can_be_sent


# ------------------------------------------------------------- single decoders


@pytest.mark.parametrize("decoder", SINGLE)
@examples(250)
@given(data=st.binary(max_size=300))
def test_random_bytes(decoder, data):
    check_single(decoder, data)


@pytest.mark.parametrize("decoder", ["asap", "enrp", "session"])
@examples(150)
@given(
    head=st.binary(min_size=1, max_size=1),
    body=st.binary(max_size=200),
    flags=st.integers(0, 255),
)
def test_random_body_with_a_right_length(decoder, head, body, flags):
    """Past the length check: a known or unknown type, its length right, anything after."""
    if decoder == "session":
        data = (
            struct.pack("!BBHHH", head[0], flags, 8 + len(body), session.VERSION, 0)
            + body
        )
    else:
        data = struct.pack("!BBH", head[0], flags, 4 + len(body)) + body
    check_single(decoder, data)


@pytest.mark.parametrize("decoder", SINGLE)
@examples(250)
@given(data=st.data())
def test_mutated_corpus(decoder, data):
    seed = data.draw(st.sampled_from(CORPUS[decoder]), label="seed input")
    mutated = fuzz.mutate(seed, data.draw(st.randoms(use_true_random=False)), decoder)
    check_single(decoder, mutated)


@examples(200)
@given(
    body=st.sampled_from(CORPUS["cookie-body"]), rnd=st.randoms(use_true_random=False)
)
def test_mutated_cookie_with_a_valid_mac(body, rnd):
    """A cookie that passes the MAC check (a leaked secret) still only raises CookieError."""
    sealed = fuzz.reseal(fuzz.mutate(body, rnd, "cookie-body"))
    try:
        fuzz.unseal(sealed)
    except cookie.CookieError as err:
        assert 0 <= err.offset <= len(sealed)
        assert err.cause == Cause.SECURITY_REJECTION
    fuzz.fuzz_one("cookie", sealed, answers=False)


# ------------------------------------------------------------- stream decoders


def same_fatal(a: ProtocolError, b: ProtocolError) -> bool:
    return type(a) is type(b) and (str(a), a.field, a.offset, a.fatal) == (
        str(b),
        b.field,
        b.offset,
        b.fatal,
    )


def drive(stream, data: bytes, chunks: list[int]) -> list:
    """Feed ``data`` in pieces, draining after each feed; check the stream's promises."""
    limit = stream.max_message_size + stream.header_size
    pieces, pos = [], 0
    for size in chunks:
        pieces.append(data[pos : pos + size])
        pos += size
    pieces.append(data[pos:])
    events: list = []
    fatal = None
    fed = 0
    for piece in pieces:
        fed += len(piece)
        try:
            stream.feed(piece)
        except ProtocolError as err:
            assert err.fatal, f"feed() raised a non-fatal {err}"
            fatal = err
            break
        while True:
            try:
                msg = stream.next_message()
            except ProtocolError as err:
                if err.fatal:
                    fatal = err
                    break
                assert 0 <= err.offset <= fed
                events.append(("error", err.field, err.offset, err.cause))
                continue
            if msg is None:
                break
            events.append(msg)
        if fatal is not None:
            break
        assert stream.buffered <= limit
    if fatal is not None:
        assert 0 <= fatal.offset <= fed
        assert stream.buffered == 0
        for _ in range(2):  # the stream stays broken, with the same error
            with pytest.raises(ProtocolError) as again:
                stream.next_message()
            assert same_fatal(again.value, fatal)
            with pytest.raises(ProtocolError) as again:
                stream.feed(b"\x00" * 100)
            assert same_fatal(again.value, fatal)
            assert stream.buffered == 0
        events.append(("fatal", fatal.field, fatal.offset))
    return events + [("reports", list(stream.reports))]


@st.composite
def stream_input(draw, decoder: str) -> bytes:
    how = draw(st.sampled_from(["random", "corpus", "mutated", "frames"]))
    if how == "random":
        return draw(st.binary(max_size=400))
    if how == "corpus":
        return draw(st.sampled_from(CORPUS[decoder]))
    if how == "mutated":
        return fuzz.mutate(
            draw(st.sampled_from(CORPUS[decoder])),
            draw(st.randoms(use_true_random=False)),
            decoder,
        )
    # frames, each perhaps mutated inside, framed right
    kind = {"asap-stream": "asap", "enrp-stream": "enrp", "shim-stream": "shim"}[
        decoder
    ]
    parts = []
    for _ in range(draw(st.integers(1, 4))):
        if kind == "shim":
            ppid = draw(
                st.sampled_from(
                    [messages.ASAP_PPID, session.XENPOOL_PPID, messages.ENRP_PPID, 0]
                )
            )
            pool = CORPUS["session" if ppid == session.XENPOOL_PPID else "asap"]
            payload = draw(st.sampled_from(pool))
            if draw(st.booleans()):
                payload = fuzz.mutate(
                    payload, draw(st.randoms(use_true_random=False)), "asap"
                )
            parts.append(framing.shim_frame(ppid, payload))
        else:
            frame = draw(st.sampled_from(CORPUS[kind]))
            if draw(st.booleans()):
                frame = fuzz.mutate(
                    frame, draw(st.randoms(use_true_random=False)), kind
                )
            parts.append(frame)
    return b"".join(parts)


MAX_SIZES = st.sampled_from([messages.MAX_MESSAGE_SIZE, 0, 4, 12, 16, 64, 300])


@pytest.mark.parametrize("decoder", STREAMS)
@examples(300)
@given(
    data=st.data(), chunks=st.lists(st.integers(0, 48), max_size=40), max_size=MAX_SIZES
)
def test_stream_any_chunking(decoder, data, chunks, max_size):
    """Only ProtocolError; at most one frame buffered after draining; a fatal error stays;
    the same bytes give the same messages and errors however they are cut."""
    raw = data.draw(stream_input(decoder))
    cut = drive(MAKE_STREAM[decoder](max_size), raw, chunks)
    whole = drive(MAKE_STREAM[decoder](max_size), raw, [])
    assert cut == whole
    fuzz.fuzz_one(decoder, raw, chunks, max_size, answers=False)


@pytest.mark.parametrize("decoder", STREAMS)
@examples(100)
@given(data=st.data(), max_size=MAX_SIZES)
def test_stream_one_byte_at_a_time(decoder, data, max_size):
    raw = data.draw(stream_input(decoder))
    assert drive(MAKE_STREAM[decoder](max_size), raw, [1] * len(raw)) == drive(
        MAKE_STREAM[decoder](max_size), raw, []
    )


@pytest.mark.parametrize("decoder", ["asap-stream", "shim-stream"])
@examples(100)
@given(
    length=st.integers(0, 0xFFFFFFFF),
    max_size=st.integers(0, 2048),
    rest=st.binary(max_size=64),
)
def test_stream_refuses_a_bad_length_at_feed(decoder, length, max_size, rest):
    """A header whose length is out of bounds is refused by the feed that completes it."""
    stream = MAKE_STREAM[decoder](max_size)
    if decoder == "shim-stream":
        header, bad = (
            struct.pack("!II", session.XENPOOL_PPID, length),
            length > max_size,
        )
    else:
        length &= 0xFFFF
        header, bad = struct.pack("!BBH", 5, 0, length), not 4 <= length <= max_size
    stream.feed(header[:-1])
    if not bad:
        stream.feed(header[-1:] + rest)
        assert stream.buffered == len(header) + len(rest)
        return
    with pytest.raises(ProtocolError) as caught:
        stream.feed(header[-1:] + rest)
    assert caught.value.fatal
    assert stream.buffered == 0
    with pytest.raises(ProtocolError):
        stream.feed(rest)
    assert stream.buffered == 0


@pytest.mark.parametrize(
    "decoder", ["asap", "enrp", "asap-stream", "enrp-stream", "shim-stream"]
)
@examples(150)
@given(data=st.data())
def test_error_answers_can_be_sent(decoder, data):
    """The ERROR message answering a reportable error encodes (fuzz_one checks it).
    Inputs are kept well below the size where it does not: see the next test."""
    seed = data.draw(st.sampled_from(CORPUS[decoder]))
    mutated = fuzz.mutate(seed, data.draw(st.randoms(use_true_random=False)), decoder)
    if len(mutated) < 60_000:
        fuzz.fuzz_one(decoder, mutated)


@pytest.mark.parametrize(
    "decoder, size", [("enrp", 65513), ("asap", 65521), ("enrp-stream", 65535)]
)
def test_answer_to_a_maximal_unknown_message(decoder, size):
    fuzz.fuzz_one(decoder, struct.pack("!BBH", 0xFF, 0, size) + bytes(size - 4))


# ----------------------------------------------------------------- the fuzz tool


def without_timings(text: str) -> str:
    return re.sub(r"slowest input .*", "", text)


def test_fuzz_run_is_clean_and_deterministic(capsys):
    assert fuzz.run(cases=2000, seed=1, progress=False) == 0
    first = capsys.readouterr().out
    assert fuzz.run(cases=2000, seed=1, progress=False) == 0
    second = capsys.readouterr().out
    assert first.strip().count("\n") == 0  # one summary line, nothing else
    assert "2000 cases, 0 crashes" in first
    assert without_timings(first) == without_timings(second)
    for decoder in fuzz.DECODERS:
        accepted, rejected = re.search(rf" {decoder} (\d+)/(\d+)", first).groups()
        assert int(rejected) > 0, decoder
        if decoder != "cookie":
            assert int(accepted) > 0, decoder


def test_campaign_outcome_depends_only_on_the_seed():
    a = fuzz.campaign(300, seed=5, emit=pytest.fail)
    b = fuzz.campaign(300, seed=5, emit=pytest.fail)
    c = fuzz.campaign(300, seed=6, emit=pytest.fail)
    assert a.outcome() == b.outcome()
    assert a.outcome() != c.outcome()
    assert a.cases == 300 and not a.failed
    assert sum(sum(counts) for counts in a.counts.values()) == 300


def test_fuzz_cli_and_progress(capsys):
    assert cli.main(["fuzz", "--cases", "100", "--seed", "3", "--quiet"]) == 0
    assert "100 cases, 0 crashes" in capsys.readouterr().out
    assert fuzz.run(cases=300, seed=3, progress=True) == 0
    out = capsys.readouterr().out
    assert "300 cases, 0 crashes" in out and "cases/s" in out


def test_fuzz_reports_a_crash(monkeypatch, capsys):
    real = messages.decode

    def buggy(data, ppid=messages.ASAP_PPID, reports=None):
        if data[:1] == b"\x05" and b"Xen" in data:
            raise IndexError("planted bug")
        return real(data, ppid, reports)

    monkeypatch.setattr(messages, "decode", buggy)
    assert fuzz.run(cases=300, seed=2, progress=False) == 1
    out = capsys.readouterr().out
    assert "CRASH in asap (" in out
    assert "IndexError: planted bug at test_fuzz.py:" in out
    assert re.search(r"  input: (05|[0-9a-f]*0558656e)", out)  # the input in hex
    assert re.search(r"one piece: 05[0-9a-f]*58656e\n", out)  # and a smaller one
    assert re.search(r"fuzz seed 2: 300 cases, [1-9]\d* crashes", out)


def test_fuzz_flags_slow_inputs_as_hangs(monkeypatch):
    monkeypatch.setattr(fuzz, "HANG_S", -1.0)  # every input is "too slow"
    found = []
    report = fuzz.campaign(14, seed=0, emit=found.append)
    assert report.hang_count == 14 and report.failed
    assert found and found[0].startswith("HANG in asap")


def test_fuzz_interrupts_an_endless_decoder(monkeypatch):
    monkeypatch.setattr(fuzz, "STUCK_S", 0.05)
    real = session.decode

    def endless(data):
        if data[:1] == b"\x01":  # CreateServer
            while True:
                pass
        return real(data)

    monkeypatch.setattr(session, "decode", endless)
    found = []
    report = fuzz.campaign(
        400, seed=0, emit=found.append
    )  # enough to reach a CreateServer in the session decoder
    assert report.hang_count >= 1
    assert any(
        line.startswith("HANG in session") and "in endless" in line for line in found
    )


def test_fuzz_one_sees_wrong_behaviour(monkeypatch):
    # a stream that does not refuse an over-long length buffers more than one frame
    monkeypatch.setattr(
        framing.RSerPoolStream,
        "_frame_size",
        lambda self, header: (header[2] << 8) | header[3] or 4,
    )
    with pytest.raises(fuzz.InvariantError, match="buffered"):
        fuzz.fuzz_one(
            "asap-stream",
            b"\x05\x00\x01\x00" + bytes(100),
            [4, 100],
            max_message_size=20,
        )
    monkeypatch.undo()

    # an error offset outside the input
    def far(data, ppid=messages.ASAP_PPID, reports=None):
        raise ProtocolError("far", field="x", offset=len(data) + 1)

    monkeypatch.setattr(messages, "decode", far)
    with pytest.raises(fuzz.InvariantError, match="offset"):
        fuzz.fuzz_one("asap", b"abcd")


def test_fuzz_one_outcomes():
    good = CORPUS["asap"][0]
    assert fuzz.fuzz_one("asap", good) == fuzz.Outcome(True, 1, 0)
    assert fuzz.fuzz_one("asap", good[:-1]) == fuzz.Outcome(False, 0, 1)
    assert fuzz.fuzz_one("asap-stream", good * 2, [3, 50]) == fuzz.Outcome(True, 2, 0)
    assert fuzz.fuzz_one("asap-stream", b"\x05\x00\x00\x02") == fuzz.Outcome(
        False, 0, 1, True
    )
    assert fuzz.fuzz_one("cookie", CORPUS["cookie"][0]).accepted
    with pytest.raises(ValueError, match="unknown decoder"):
        fuzz.fuzz_one("nope", b"")


def test_mutate_is_deterministic_and_finds_length_fields():
    seed = CORPUS["asap"][0]
    assert fuzz.mutate(seed, random.Random(7), "asap") == fuzz.mutate(
        seed, random.Random(7), "asap"
    )
    fields, cuts = fuzz.structure(seed, "asap")
    offsets = {f[0] for f in fields}
    assert {
        2,
        6,
        14,
    } <= offsets  # message length, pool handle length, pool element length
    assert 4 in cuts and 12 in cuts
    shim_fields, _ = fuzz.structure(CORPUS["shim-stream"][0], "shim-stream")
    assert (4, 4) == shim_fields[0][:2]  # the shim's 32-bit length comes first
