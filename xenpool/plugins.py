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
from twisted.logger import Logger
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


log = Logger()


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

    def __init__(
        self,
        manager: pluggy.PluginManager,
        reactor: Any = None,
        *,
        tolerated: Iterable[str] = (),
        broken: dict[str, str] | None = None,
    ) -> None:
        self.manager = manager
        self.reactor = reactor
        self._providers: dict[str, dict[str, Provider]] = {kind: {} for kind in KINDS}
        # third-party plugins (by name) whose faults disable only themselves, and what is
        # disabled: "plugin NAME" or "KIND NAME" -> why (one line each, warned once)
        self.tolerated = set(tolerated)
        self.broken: dict[str, str] = dict(broken or {})
        self._broken_providers: dict[tuple[str, str], str] = {}
        for kind, spec in KINDS.items():
            hook = getattr(manager.hook, spec.hook)
            for impl in hook.get_hookimpls():
                plugin_name = manager.get_name(impl.plugin) or repr(impl.plugin)
                if f"plugin {plugin_name}" in self.broken:
                    continue
                try:
                    impl.function(register=self._registrar(kind, plugin_name))
                except Exception as err:
                    if plugin_name not in self.tolerated:
                        raise
                    why = str(err) if isinstance(err, PluginError) else _one_line(err)
                    self._disable(
                        f"plugin {plugin_name}",
                        f"plugin {plugin_name!r}: its {spec.hook} hook failed: {why}",
                    )

    def _disable(self, key: str, why: str) -> None:
        """A third-party plugin or provider that is broken: disabled, one warning."""
        self.broken[key] = why
        log.warn("{why}; disabled", why=why)

    def _registrar(
        self, kind: str, plugin_name: str
    ) -> Callable[[str, Callable[..., Any]], None]:
        spec = KINDS[kind]

        def register(name: str, factory: Callable[..., Any]) -> None:
            existing = self._providers[kind].get(name)
            problem = None
            if existing is not None:
                problem = f"plugin {plugin_name!r}: {spec.label} {name!r} is already provided by plugin {existing.plugin!r}"
            elif isinstance(factory, type):
                try:
                    verifyClass(spec.interface, factory)
                except Invalid as err:
                    problem = (
                        f"plugin {plugin_name!r}: {spec.label} {name!r} ({factory.__name__}) "
                        f"does not implement {spec.interface.__name__}: {_one_line(err)}"
                    )
            if problem is None:
                self._providers[kind][name] = Provider(kind, name, factory, plugin_name)
            elif plugin_name in self.tolerated:
                self._broken_providers[(kind, name)] = problem
                self._disable(f"{kind} {name}", problem)
            else:
                raise PluginError(problem)

        return register

    def names(self, kind: str) -> list[str]:
        return sorted(self._providers[kind])

    def providers(self, kind: str) -> list[Provider]:
        return [self._providers[kind][n] for n in self.names(kind)]

    def get(self, kind: str, name: str) -> Provider:
        try:
            return self._providers[kind][name]
        except KeyError:
            if (kind, name) in self._broken_providers:
                raise PluginError(
                    f"{self._broken_providers[kind, name]} (disabled)"
                ) from None
            installed = ", ".join(self.names(kind)) or "none"
            disabled = [
                why for key, why in self.broken.items() if key.startswith("plugin ")
            ]
            also = f"; disabled: {'; '.join(disabled)}" if disabled else ""
            raise UnknownProvider(
                f"no {KINDS[kind].label} named {name!r}; installed: {installed}{also}"
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
    tolerated: set[str] = set()  # third-party entry points: a fault disables only them
    broken: dict[str, str] = {}

    def disable(name: str, why: str) -> None:
        broken[f"plugin {name}"] = why
        log.warn("{why}; disabled", why=why)

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
            third_party = name != "builtin"
            try:
                plugin = ep.load()
            except Exception as err:
                why = f"plugin {name!r} ({ep.value}) cannot be loaded: {_one_line(err)}"
                if not third_party:
                    raise PluginError(why) from None
                disable(name, why)
                continue
            try:
                _register(manager, plugin, name)
                _check_hooks(manager, plugin, name)
            except PluginError as err:
                if not third_party:
                    raise
                if manager.is_registered(plugin):
                    manager.unregister(plugin)
                disable(name, str(err))
                continue
            if third_party:
                tolerated.add(name)
    for module in modules:
        _register(manager, module, getattr(module, "__name__", repr(module)))
    try:
        manager.check_pending()
    except pluggy.PluginValidationError as err:
        raise PluginError(_one_line(err)) from None
    return Plugins(manager, reactor, tolerated=tolerated, broken=broken)


def _check_hooks(manager: pluggy.PluginManager, plugin: object, name: str) -> None:
    """Every hook ``plugin`` implements is one of xenpool's (pluggy's check_pending, for
    one plugin)."""
    for caller in manager.get_hookcallers(plugin) or []:
        if not caller.has_spec():
            raise PluginError(f"plugin {name!r}: unknown hook {caller.name!r}")
