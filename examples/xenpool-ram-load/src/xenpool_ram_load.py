"""A xenpool plugin: the load metric ``ram-only``.

A pool element reports one number in [0, 1] as its load; with ``--load-plugin ram-only``
that number is the fraction of the host's RAM in use, whatever the CPUs are doing. It
suits pools where memory, not CPU, decides how many more VMs a host can take.

xenpool finds this module through the ``xenpool`` entry point in setup.cfg, calls the
hook below, and checks ``RamOnlyLoad`` against ``ILoadMetric`` before using it.
"""

from __future__ import annotations

from zope.interface import implementer

from xenpool.hookspecs import hookimpl
from xenpool.interfaces import ILoadMetric, LoadSample

__version__ = "0.1.0"


@implementer(ILoadMetric)
class RamOnlyLoad:
    """load = RAM in use / RAM in total, capped to [0, 1]."""

    name = "ram-only"

    def load(self, sample: LoadSample) -> float:
        return min(max(sample.ram, 0.0), 1.0)


@hookimpl
def xenpool_register_load_metrics(register):
    """Called once when xenpool loads its plugins; ``register(name, factory)`` per metric.

    ``RamOnlyLoad`` takes no options, so ``create("load", "ram-only")`` is all it needs.
    """
    register(RamOnlyLoad.name, RamOnlyLoad)
