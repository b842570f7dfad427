"""What a plugin author checks before publishing. Run in a venv that has xenpool:

pip install -e . && python -m pytest tests
"""

import pytest
import xenpool_ram_load
from xenpool_ram_load import RamOnlyLoad
from zope.interface.verify import verifyClass, verifyObject

from xenpool.interfaces import ILoadMetric, LoadSample
from xenpool.plugins import load_plugins


def test_the_class_implements_the_interface():
    verifyClass(ILoadMetric, RamOnlyLoad)
    verifyObject(ILoadMetric, RamOnlyLoad())


@pytest.mark.parametrize(
    "cpu, ram, expected",
    [
        (0.9, 0.3, 0.3),
        (0.0, 0.0, 0.0),
        (2.5, 1.0, 1.0),
        (0.1, 1.7, 1.0),
        (0.5, -0.2, 0.0),
    ],
)
def test_the_load_is_the_ram_fraction_capped_to_0_1(cpu, ram, expected):
    assert RamOnlyLoad().load(LoadSample(cpu=cpu, ram=ram)) == expected


def test_xenpool_accepts_the_module():
    # The module alone, through the same hook call and interface checks as at start-up.
    plugins = load_plugins(entry_points=False, modules=[xenpool_ram_load])
    assert plugins.names("load") == ["ram-only"]
    assert plugins.create("load", "ram-only").load(LoadSample(cpu=0.9, ram=0.3)) == 0.3


def test_the_entry_point_is_installed():
    # Fails until the package is installed (pip install -e .): entry points live in its metadata.
    provider = load_plugins().get("load", "ram-only")
    assert provider.plugin == "xenpool-ram-load:ram-load"  # distribution:entry point
    assert provider.factory is RamOnlyLoad
