"""The fakes of xenpool.testing provide the contracts they stand in for."""

import inspect

import pytest
from zope.interface.verify import verifyObject

from xenpool.interfaces import IHypervisor, IStonith
from xenpool.pe.core import Fencer
from xenpool.pu.core import Channel, PoolAccess
from xenpool.testing import (
    MemoryHypervisor,
    RecordingFencer,
    RecordingStonith,
    ScriptedPE,
    ScriptedPool,
)


@pytest.mark.parametrize(
    "interface, fake",
    [(IHypervisor, MemoryHypervisor()), (IStonith, RecordingStonith())],
    ids=["IHypervisor", "IStonith"],
)
def test_each_fake_provides_its_interface(interface, fake):
    assert verifyObject(interface, fake)


def _methods(protocol) -> dict[str, inspect.Signature]:
    return {
        name: inspect.signature(member)
        for name, member in vars(protocol).items()
        if callable(member) and not name.startswith("_")
    }


@pytest.mark.parametrize(
    "protocol, fake",
    [
        (Fencer, RecordingFencer()),
        (PoolAccess, ScriptedPool(None)),
        (Channel, ScriptedPE(1)),
    ],
    ids=["Fencer", "PoolAccess", "Channel"],
)
def test_each_fake_has_its_protocols_methods(protocol, fake):
    """The typing Protocols have no verifyObject: the same check by hand, every method
    there with the protocol's parameters."""
    methods = _methods(protocol)
    assert methods
    for name, signature in methods.items():
        implemented = inspect.signature(getattr(fake, name))
        expected = list(signature.parameters)[1:]  # without self
        assert list(implemented.parameters)[: len(expected)] == expected, name
