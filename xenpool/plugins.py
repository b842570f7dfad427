"""The plugin loader: finds the providers plugins register (entry points) and checks them against their contracts.

``load_plugins()`` builds a pluggy manager, loads the ``xenpool`` entry-point group (the
built-ins are listed there too), asks every plugin to register its providers, and checks
each factory against its interface. There is no global manager: daemons build one at
start-up and pass it on; tests build their own from plain modules.

A daemon gives ``load_plugins`` its reactor; ``Plugins.create`` passes it to every factory
that takes a ``reactor`` keyword (stonith, storage, hypervisor providers) and was not given
one. A provider made without one uses ``global_reactor()``, imported when first needed.
"""

from __future__ import annotations

import importlib.metadata
import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import pluggy
from zope.interface import Interface
from zope.interface.exceptions import Invalid
from zope.interface.verify import verifyClass, verifyObject

from . import hookspecs
from .interfaces import (
    IHypervisor,
    ILoadMetric,
    IPoolPolicy,
    IRebalancer,
    IStonith,
    IStorage,
)


@dataclass(frozen=True)
class Kind:
    hook: str
    interface: type[Interface]
    label: str


KINDS = {
    "load": Kind("xenpool_register_load_metrics", ILoadMetric, "load metric"),
    "policy": Kind("xenpool_register_pool_policies", IPoolPolicy, "pool policy"),
    "stonith": Kind("xenpool_register_stonith", IStonith, "stonith"),
    "storage": Kind("xenpool_register_storage", IStorage, "storage"),
    "hypervisor": Kind("xenpool_register_hypervisors", IHypervisor, "hypervisor"),
    "rebalancer": Kind("xenpool_register_rebalancers", IRebalancer, "rebalancer"),
}


class PluginError(Exception):
    """A plugin that cannot be used; the message names it and what is wrong."""


class UnknownProvider(PluginError, LookupError):
    pass


@dataclass(frozen=True)
class Provider:
    kind: str
    name: str
    factory: Callable[..., Any]
    plugin: str  # the plugin (module / entry point) that registered it


def global_reactor() -> Any:
    """The process's reactor, imported on first use: what a provider made without a
    ``reactor`` option runs on."""
    from twisted.internet import reactor

    return reactor


def _takes_reactor(factory: Callable[..., Any]) -> bool:
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # a builtin without a signature
        return False
    parameter = parameters.get("reactor")
    return parameter is not None and parameter.kind in (
        parameter.POSITIONAL_OR_KEYWORD,
        parameter.KEYWORD_ONLY,
    )


class Plugins:
    """The providers every loaded plugin registered, by kind and name. ``reactor``: given
    to every factory that takes a ``reactor`` keyword (None: each uses the global one)."""

    def __init__(self, manager: pluggy.PluginManager, reactor: Any = None) -> None:
        self.manager = manager
        self.reactor = reactor
        self._providers: dict[str, dict[str, Provider]] = {kind: {} for kind in KINDS}
        for kind, spec in KINDS.items():
            hook = getattr(manager.hook, spec.hook)
            for impl in hook.get_hookimpls():
                plugin_name = manager.get_name(impl.plugin) or repr(impl.plugin)
                impl.function(register=self._registrar(kind, plugin_name))

    def _registrar(
        self, kind: str, plugin_name: str
    ) -> Callable[[str, Callable[..., Any]], None]:
        spec = KINDS[kind]

        def register(name: str, factory: Callable[..., Any]) -> None:
            existing = self._providers[kind].get(name)
            if existing is not None:
                raise PluginError(
                    f"plugin {plugin_name!r}: {spec.label} {name!r} is already provided by plugin {existing.plugin!r}"
                )
            if isinstance(factory, type):
                try:
                    verifyClass(spec.interface, factory)
                except Invalid as err:
                    raise PluginError(
                        f"plugin {plugin_name!r}: {spec.label} {name!r} ({factory.__name__}) "
                        f"does not implement {spec.interface.__name__}: {_one_line(err)}"
                    ) from None
            self._providers[kind][name] = Provider(kind, name, factory, plugin_name)

        return register

    def names(self, kind: str) -> list[str]:
        return sorted(self._providers[kind])

    def providers(self, kind: str) -> list[Provider]:
        return [self._providers[kind][n] for n in self.names(kind)]

    def get(self, kind: str, name: str) -> Provider:
        try:
            return self._providers[kind][name]
        except KeyError:
            installed = ", ".join(self.names(kind)) or "none"
            raise UnknownProvider(
                f"no {KINDS[kind].label} named {name!r}; installed: {installed}"
            ) from None

    def create(self, kind: str, name: str, **options: Any) -> Any:
        """Make a provider object and check it against its interface."""
        provider = self.get(kind, name)
        spec = KINDS[kind]
        if (
            self.reactor is not None
            and "reactor" not in options
            and _takes_reactor(provider.factory)
        ):
            options = {**options, "reactor": self.reactor}
        try:
            obj = provider.factory(**options)
        except Exception as err:  # a plugin's failure must not escape as a traceback
            raise PluginError(
                f"plugin {provider.plugin!r}: {spec.label} {name!r}: {_one_line(err)}"
            ) from None
        try:
            verifyObject(spec.interface, obj)
        except Invalid as err:
            raise PluginError(
                f"plugin {provider.plugin!r}: {spec.label} {name!r} made an object that does not "
                f"provide {spec.interface.__name__}: {_one_line(err)}"
            ) from None
        return obj


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


def _register(manager: pluggy.PluginManager, plugin: object, name: str) -> None:
    try:
        manager.register(plugin, name=name)
    except pluggy.PluginValidationError as err:
        raise PluginError(f"plugin {name!r}: {_one_line(err)}") from None


def load_plugins(
    *, entry_points: bool = True, modules: Iterable[object] = (), reactor: Any = None
) -> Plugins:
    """Build the plugin set: the ``xenpool`` entry points (built-ins included) and any
    extra plugin ``modules`` (handy in tests). ``reactor`` goes to the providers' factories
    that take one (``Plugins.create``).

    Entry points are loaded here, not at import. Each is named ``dist:entry`` so two
    packages cannot shadow each other by choosing the same entry-point name.
    """
    manager = pluggy.PluginManager(hookspecs.PROJECT)
    manager.add_hookspecs(hookspecs)
    if entry_points:
        for ep in importlib.metadata.entry_points(group=hookspecs.PROJECT):
            dist = ep.dist.name if ep.dist is not None else "?"
            name = (
                "builtin"
                if dist == "xenpool" and ep.name == "builtin"
                else f"{dist}:{ep.name}"
            )
            if manager.has_plugin(name):  # the same distribution seen twice on sys.path
                continue
            try:
                plugin = ep.load()
            except Exception as err:
                raise PluginError(
                    f"plugin {name!r} ({ep.value}) cannot be loaded: {_one_line(err)}"
                ) from None
            _register(manager, plugin, name)
    for module in modules:
        _register(manager, module, getattr(module, "__name__", repr(module)))
    try:
        manager.check_pending()
    except pluggy.PluginValidationError as err:
        raise PluginError(_one_line(err)) from None
    return Plugins(manager, reactor)
