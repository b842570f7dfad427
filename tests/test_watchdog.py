"""The ``watchdog`` stonith provider (plugins/stonith.py): the feeder on a Clock with a
file standing in for /dev/watchdog, and the fence on a Clock with a pool stand-in. No
sleeps: time moves by ``Clock.advance``."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from xenpool.interfaces import FenceTarget, ISelfFencing
from xenpool.pe.fencing import StonithFencer
from xenpool.pe.service import PoolElementService
from xenpool.plugins import PluginError, load_plugins
from xenpool.protocol import messages as M
from xenpool.testing import RecordingStonith
from xenpool_plugins.stonith import (
    FenceFailed,
    WatchdogDevice,
    WatchdogFeeder,
    WatchdogStonith,
)

LOST, TIMEOUT, MARGIN = (
    3.0,
    2.0,
    0.5,
)  # feeds every 0.5 s; a fence waits 3 + 2 * 2 + 0.5 = 7.5 s
WAIT = LOST + 2 * TIMEOUT + MARGIN


def test_created_by_name_and_provides_self_fencing():
    stonith = load_plugins().create(
        "stonith",
        "watchdog",
        **{
            "device": "/dev/watchdog",
            "lost-after": "20",
            "timeout": "30",
            "margin": "5",
        },
    )
    assert verifyObject(ISelfFencing, stonith)
    assert (stonith.lost_after, stonith.timeout, stonith.margin, stonith.wait_s) == (
        20,
        30,
        5,
        85,
    )
    assert stonith.refresh_interval_s == pytest.approx(20 / 3)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"lost-after": "0"}, "lost-after must be a number > 0"),
        ({"lost-after": "soon"}, "lost-after must be a number > 0"),
        ({"timeout": "-1"}, "timeout must be a number > 0"),
        ({"timeout": "inf"}, "timeout must be a number > 0"),
        ({"margin": "-0.1"}, "margin must be a number >= 0"),
        ({"device": " "}, "device must name a watchdog device"),
        ({"lost_afer": "3"}, "unknown option lost_afer"),
    ],
)
def test_bad_options_are_refused_naming_the_field(options, message):
    with pytest.raises(PluginError) as caught:
        load_plugins().create("stonith", "watchdog", **options)
    assert message in str(caught.value) and "\n" not in str(caught.value)


# -- the feeder ------------------------------------------------------------------------------


class Channel:
    """A registrar association, as the feeder sees it: only its identity matters."""


@pytest.fixture
def fed(tmp_path):
    clock = Clock()
    path = tmp_path / "watchdog"
    path.write_bytes(b"")
    holds = {"vms": True}
    stonith = WatchdogStonith(
        str(path),
        timeout=TIMEOUT,
        margin=MARGIN,
        reactor=clock,
        now=clock.seconds,
        **{"lost-after": LOST},
    )
    stonith.attach(membership=None, holds_vms=lambda: holds["vms"])
    feeder = stonith.feeder(clock)
    yield clock, path, feeder, holds
    if feeder.running:
        feeder.stopService()


def confirm(feeder: WatchdogFeeder, channel: Channel, accepted: bool = True) -> None:
    feeder.sent(channel)
    feeder.answered(channel, accepted)


def feeds(path) -> int:
    return path.read_bytes().count(b".")


def test_nothing_is_fed_before_a_registrar_confirmed_the_pe(fed):
    clock, path, feeder, _ = fed
    feeder.startService()
    clock.advance(10)
    assert feeds(path) == 0 and not feeder.feeding


def test_feeds_while_confirmed_and_stops_lost_after_the_last_confirmation(fed):
    clock, path, feeder, _ = fed
    feeder.startService()
    channel = Channel()
    confirm(feeder, channel)  # sent and answered at 0
    assert feeds(path) == 1  # fed at once
    for _ in range(
        8
    ):  # every lost-after / 3, as the PE refreshes: fed every 0.5 s throughout
        clock.pump([0.5, 0.5])
        confirm(feeder, channel)
    assert feeds(path) == 17 and feeder.feeding
    last_confirmed = clock.seconds()
    clock.pump(
        [0.5] * 6
    )  # the tick exactly lost-after after the last confirmation still feeds
    assert clock.seconds() - last_confirmed == LOST and feeder.feeding
    before = feeds(path)
    clock.advance(0.5)  # the first tick more than lost-after after it does not
    assert not feeder.feeding and feeds(path) == before
    clock.pump([0.5] * 60)
    assert feeds(path) == before
    assert clock.seconds() - last_confirmed > LOST


def test_a_confirmation_counts_from_when_its_registration_was_sent(fed):
    clock, path, feeder, _ = fed
    feeder.startService()
    channel = Channel()
    feeder.sent(channel)
    clock.advance(LOST - 0.1)  # the answer takes almost lost-after to come
    feeder.answered(channel, True)
    assert feeder.feeding
    clock.advance(0.5)  # lost-after after the registration was sent: no more feeding
    assert not feeder.feeding


def test_a_refusal_a_keep_alive_or_an_answer_after_the_channel_was_lost_proves_nothing(
    fed,
):
    clock, path, feeder, _ = fed
    feeder.startService()
    channel = Channel()
    confirm(feeder, channel, accepted=False)  # REGISTRATION_RESPONSE with reject
    pe = SimpleNamespace(
        core=SimpleNamespace(
            settings=SimpleNamespace(pool_handle=b"Xen", pe_identifier=7)
        ),
        registration_watchers=[feeder],
        registered=True,
    )
    sent = []
    channel.send = sent.append
    PoolElementService.from_registrar(pe, M.EndpointKeepAlive(1, b"Xen", 7), channel)
    assert sent  # the PE acknowledged the keep-alive ...
    clock.advance(1)
    assert feeds(path) == 0  # ... and that fed nothing
    feeder.sent(channel)
    feeder.lost(channel)  # the association closed before the answer
    feeder.answered(channel, True)
    clock.advance(1)
    assert feeds(path) == 0
    other = Channel()
    feeder.sent(other)
    PoolElementService.from_registrar(pe, M.RegistrationResponse(b"Xen", 7), other)
    assert feeder.feeding and feeds(path) == 1


def test_feeding_resumes_when_contact_returns(fed):
    clock, path, feeder, _ = fed
    feeder.startService()
    channel = Channel()
    confirm(feeder, channel)
    clock.advance(LOST + 1)
    assert not feeder.feeding
    starved = feeds(path)
    clock.advance(5)
    assert feeds(path) == starved
    confirm(feeder, Channel())  # a registrar answers again (another association)
    assert feeder.feeding and feeds(path) == starved + 1
    clock.pump([0.5, 0.5])
    assert feeds(path) == starved + 3


def test_a_clean_stop_disarms_only_a_pe_without_vms(fed):
    clock, path, feeder, holds = fed
    feeder.startService()
    confirm(feeder, Channel())
    feeder.stopService()  # VMs run on for their lease: the watchdog stays armed
    assert not path.read_bytes().endswith(b"V")
    stonith = WatchdogStonith(
        str(path), timeout=TIMEOUT, reactor=clock, now=clock.seconds
    )
    stonith.attach(None, lambda: False)
    idle = stonith.feeder(clock)
    idle.startService()
    idle.stopService()
    assert path.read_bytes().endswith(b"V")  # the magic close


def test_a_device_that_cannot_be_opened_is_refused_naming_it(tmp_path):
    stonith = WatchdogStonith(str(tmp_path / "missing"))
    with pytest.raises(OSError) as caught:
        stonith.feeder(Clock())
    assert caught.value.strerror.startswith(
        f"device: cannot open the watchdog {tmp_path / 'missing'}"
    )


def test_a_character_device_whose_timeout_cannot_be_read_is_refused():
    device = WatchdogDevice(
        "/dev/null", 10.0
    )  # a character device without watchdog ioctls
    with pytest.raises(
        ValueError, match="timeout: cannot read the timeout of the watchdog /dev/null"
    ):
        device.open()
    assert device.fd is None


def test_the_feeder_writes_into_a_fifo_through_the_seam(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        clock = Clock()
        stonith = WatchdogStonith(
            str(fifo), timeout=TIMEOUT, reactor=clock, now=clock.seconds
        )
        feeder = stonith.feeder(clock)
        feeder.startService()
        confirm(feeder, Channel())
        clock.advance(0.5)
        assert os.read(reader, 100) == b".."
        feeder.stopService()
    finally:
        os.close(reader)


# -- the fence -------------------------------------------------------------------------------


class Pool:
    """The pool's answers to "is PE N registered?", in order (the last one repeats); an
    Exception instance fails the question."""

    def __init__(self, *answers) -> None:
        self.answers = list(answers)
        self.asked = 0

    def registered(self, pe_identifier: int) -> defer.Deferred:
        self.asked += 1
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        return (
            defer.fail(answer)
            if isinstance(answer, Exception)
            else defer.succeed(answer)
        )


def fencer(pool: Pool):
    clock = Clock()
    stonith = WatchdogStonith(
        "/dev/watchdog",
        timeout=TIMEOUT,
        margin=MARGIN,
        reactor=clock,
        now=clock.seconds,
        **{"lost-after": LOST},
    )
    stonith.attach(pool, lambda: True)
    return clock, stonith


def outcome(d: defer.Deferred):
    result = []
    d.addBoth(result.append)
    return result


def test_a_host_still_registered_is_not_fenced():
    clock, stonith = fencer(Pool(True))
    result = outcome(stonith.fence(FenceTarget("host1", {}, 0x11)))
    assert isinstance(result[0], Failure) and result[0].check(FenceFailed)
    assert str(result[0].value) == (
        "host host1 is still registered with the pool (PE 0x00000011); a watchdog fence would not reset it"
    )


@pytest.mark.parametrize(
    "target, pool, message",
    [
        (FenceTarget("host1"), Pool(False), "which PE ran there is not known"),
        (
            FenceTarget("host1", {}, 5),
            Pool(ConnectionError("registrar 2 of 2 did not answer")),
            "cannot tell whether host host1 (PE 0x00000005) is still registered with the pool: registrar 2 of 2 did not answer",
        ),
    ],
)
def test_no_fence_without_knowing(target, pool, message):
    clock, stonith = fencer(pool)
    result = outcome(stonith.fence(target))
    assert result[0].check(FenceFailed) and message in str(result[0].value)


def test_an_unregistered_host_is_fenced_only_after_the_full_wait():
    pool = Pool(False)
    clock, stonith = fencer(pool)
    result = outcome(stonith.fence(FenceTarget("host1", {}, 0x11)))
    assert stonith.wait_s == WAIT
    clock.pump([0.25] * int((WAIT - 0.25) / 0.25))  # until 0.25 s before the end
    clock.advance(0.2)
    assert result == [] and clock.seconds() == pytest.approx(WAIT - 0.05)
    clock.advance(0.05)
    assert result == [None]
    assert (
        pool.asked >= WAIT / stonith.check_interval
    )  # asked again all along, and at the end


def test_a_host_registered_again_while_waiting_is_not_fenced():
    clock, stonith = fencer(Pool(False, False, False, True))
    result = outcome(stonith.fence(FenceTarget("host1", {}, 0x11)))
    clock.pump([0.25] * 40)
    assert "registered with the pool again while its watchdog fence waited" in str(
        result[0].value
    )


def test_a_fence_with_a_wall_clock_that_jumps_still_waits_the_monotonic_time():
    pool = Pool(False)
    clock, stonith = fencer(pool)
    monotonic = [0.0]
    stonith._now = lambda: monotonic[0]
    result = outcome(stonith.fence(FenceTarget("host1", {}, 0x11)))
    clock.pump(
        [1.0] * 20
    )  # the reactor's clock runs far ahead; the monotonic clock stands
    assert result == []
    monotonic[0] = WAIT
    clock.advance(1.0)
    assert result == [None]


def test_the_fencer_gives_the_provider_the_pe_identifier():
    stonith = RecordingStonith()
    StonithFencer(stonith, {"host1": {"plug": "1"}}).fence("host1", 0x11)
    StonithFencer(stonith, {}).fence("host2")
    assert stonith.targets == [
        FenceTarget("host1", {"plug": "1"}, 0x11),
        FenceTarget("host2", {}, 0),
    ]
