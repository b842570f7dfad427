"""The hooks a xenpool plugin implements (pluggy, project name ``xenpool``).

A plugin is a module listed in the ``xenpool`` entry-point group. It implements any of
these hooks; each receives a ``register`` callable and calls ``register(name, factory)``
once per provider. ``factory(**options)`` returns an object providing the kind's
interface (usually the factory is a class implementing it)::

    from xenpool.hookspecs import hookimpl

    @hookimpl
    def xenpool_register_load_metrics(register):
        register("ram-only", RamOnlyLoad)

Built-in plugins use the very same entry points.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import pluggy

PROJECT = "xenpool"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class Register(Protocol):
    def __call__(self, name: str, factory: Callable[..., object]) -> None: ...


@hookspec
def xenpool_register_load_metrics(register: Register) -> None:
    """Register ILoadMetric factories (``--load-plugin NAME`` on the PE)."""


@hookspec
def xenpool_register_pool_policies(register: Register) -> None:
    """Register IPoolPolicy factories, named as rsplib names policies (``LeastUsed``)."""


@hookspec
def xenpool_register_stonith(register: Register) -> None:
    """Register IStonith factories (``fence-agent``, ``libvirt``, ``manual``, ...)."""


@hookspec
def xenpool_register_storage(register: Register) -> None:
    """Register IStorage factories (``nbd``, ``iscsi``, ``aoe``, ``path``, ...)."""


@hookspec
def xenpool_register_hypervisors(register: Register) -> None:
    """Register IHypervisor factories by URI scheme family (``libvirt``, ``sim``)."""


@hookspec
def xenpool_register_rebalancers(register: Register) -> None:
    """Register IRebalancer factories (``--rebalance NAME`` on the PE and in ``xenpool sim``)."""
