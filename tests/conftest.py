"""Fixtures shared by the test modules; helpers they share are in ``tests/helpers.py``,
fakes of xenpool's contracts in ``xenpool.testing``."""

import os

import pytest
from hypothesis import HealthCheck, settings
from twisted.internet.task import Clock

from xenpool.pe.accounting import HostAccounting, LoadSettings
from xenpool.pe.core import PeSettings, PoolElementCore
from xenpool.testing import MemoryHypervisor
from xenpool_plugins.load import WeightedLoad

from .helpers import NODE, SECRET

# CI runs a fixed, bounded number of cases; XENPOOL_HYPOTHESIS=long for a deeper local run.
settings.register_profile(
    "ci", max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("long", max_examples=5000, deadline=None)
settings.load_profile(os.environ.get("XENPOOL_HYPOTHESIS", "ci"))


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def pe(clock):
    accounting = HostAccounting(NODE, LoadSettings(sample_interval_s=30))
    updates = []
    core = PoolElementCore(
        PeSettings(pe_identifier=7, host="pe1", secret=SECRET, cookie_max_age_s=60),
        MemoryHypervisor(),
        accounting,
        WeightedLoad(),
        clock,
        load_changed=lambda: updates.append(clock.seconds()),
    )
    core.updates = updates
    return core
