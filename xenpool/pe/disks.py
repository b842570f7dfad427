"""The PE's disk dispatch: a disk spec goes to the one ``IStorage`` plugin that handles its scheme.

A create request names its disk with a *spec* (``nbd://host/export``, ``iscsi://...``,
``aoe:e1.2``, ``/var/lib/images/vm.qcow2``, ...). ``storage_for`` finds the storage plugin whose
``schemes`` has the spec's scheme (through the plugin registry and ``IStorage`` only: which
plugins exist is the registry's business) and parses the spec with it; the empty spec means
"no disk" and needs no plugin (``NO_DISK``). For every start the PE then checks the disk is
reachable and takes its ``<disk>`` XML (``disk_xml_function``), and releases it after the VM
stopped (``disk_release_function``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

from twisted.internet import defer
from zope.interface import implementer

from ..interfaces import Disk, DiskSpecError, IStorage

__all__ = [
    "NO_DISK",
    "NoStorage",
    "disk_release_function",
    "disk_xml_function",
    "scheme_of",
    "storage_for",
    "supported_schemes",
]

_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")


def scheme_of(spec: str) -> str | None:
    """The scheme a disk spec names: ``nbd``, ``iscsi``, ``aoe``, ``file``, ... (lower case),
    ``path`` for a plain absolute path, None for the empty spec ("no disk")."""
    if spec == "":
        return None
    if spec.startswith("/"):
        return "path"
    m = _SCHEME.match(spec)
    if m is None:
        raise DiskSpecError(
            f"disk spec {spec!r} is neither an absolute path nor SCHEME:..."
        )
    return m.group(1).lower()


@implementer(IStorage)
class NoStorage:
    """The empty spec: a VM without a disk (diskless, or booting from the network)."""

    name = "none"
    schemes = ("",)

    def parse(self, spec: str) -> Disk:
        if spec != "":
            raise DiskSpecError(
                f"the no-disk storage takes only the empty spec, got {spec!r}"
            )
        return Disk("", "", {})

    def check(self, disk: Disk) -> defer.Deferred:
        return defer.succeed(None)

    def domain_xml(self, disk: Disk, target: str) -> str:
        return ""

    def release(self, disk: Disk) -> defer.Deferred:
        return defer.succeed(None)


#: What ``storage_for`` answers the empty spec with.
NO_DISK = NoStorage()


def _schemes(provider: Any, create: Callable[[], Any]) -> tuple[str, ...]:
    schemes: Any = getattr(provider.factory, "schemes", None)
    if schemes is None:  # a factory function: ask an instance
        schemes = getattr(create(), "schemes", ())
    return tuple(s.lower() for s in schemes)


def supported_schemes(plugins: Any) -> list[str]:
    """Every scheme some installed storage plugin handles, sorted."""
    found: set[str] = set()
    for provider in plugins.providers("storage"):
        found.update(
            _schemes(provider, partial(plugins.create, "storage", provider.name))
        )
    return sorted(found)


def storage_for(
    plugins: Any, spec: str, options: Mapping[str, Mapping[str, Any]] | None = None
) -> tuple[Any, Disk]:
    """The storage provider for a disk spec and the parsed disk: ``(provider, Disk)``.

    ``plugins`` is a ``xenpool.plugins.Plugins``; the ``IStorage`` provider is the one whose ``schemes``
    has the spec's scheme (``path`` for a plain absolute path) and is made with
    ``options[provider name]`` as keyword arguments (``{"nbd": {"timeout_s": 2}}``). The
    empty spec means no disk: ``(NO_DISK, Disk("", "", {}))``. Raises ``DiskSpecError``
    (a ValueError) for a spec no plugin handles, listing the supported schemes, or that its
    plugin refuses; ``PluginError`` if the plugin cannot be made.
    """
    try:
        scheme = scheme_of(spec)
    except DiskSpecError as err:
        raise DiskSpecError(
            f"{err}; supported schemes: {', '.join(supported_schemes(plugins)) or 'none'}"
        ) from None
    if scheme is None:
        return NO_DISK, NO_DISK.parse("")
    options = options or {}
    matches = []
    for provider in plugins.providers("storage"):
        opts = dict(options.get(provider.name, {}))
        if scheme in _schemes(
            provider, partial(plugins.create, "storage", provider.name, **opts)
        ):
            matches.append(provider)
    if not matches:
        supported = ", ".join(supported_schemes(plugins)) or "none"
        raise DiskSpecError(
            f"no storage plugin handles {scheme!r} disks like {spec!r}; supported schemes: {supported} "
            "('path' is a plain absolute path)"
        )
    if len(matches) > 1:
        names = ", ".join(f"{p.name} (plugin {p.plugin})" for p in matches)
        raise DiskSpecError(
            f"{scheme!r} disks are handled by more than one storage plugin: {names}"
        )
    provider = plugins.create(
        "storage", matches[0].name, **dict(options.get(matches[0].name, {}))
    )
    return provider, provider.parse(spec)


def disk_xml_function(
    plugins: Any,
    target: str = "vda",
    options: Mapping[str, Mapping[str, Any]] | None = None,
) -> Callable[[str], defer.Deferred]:
    """The ``disk spec -> Deferred[disk XML]`` callable ``PoolElementCore(disk_xml=...)`` takes:
    parse the spec, check the disk is reachable, then give its ``<disk>`` element for
    ``target`` (``vda`` for KVM and the test driver, ``xvda`` for Xen). The Deferred fails with
    ``DiskSpecError`` or ``DiskUnreachable`` (the PE answers DISK_UNREACHABLE with its text)."""

    async def disk_xml(spec: str) -> str:
        provider, disk = storage_for(plugins, spec, options)
        await provider.check(disk)
        return provider.domain_xml(disk, target)

    def run(spec: str) -> defer.Deferred:
        return defer.Deferred.fromCoroutine(disk_xml(spec))

    return run


def disk_release_function(
    plugins: Any, options: Mapping[str, Mapping[str, Any]] | None = None
) -> Callable[[str], defer.Deferred]:
    """The ``disk spec -> Deferred`` callable ``PoolElementCore(disk_release=...)`` takes:
    release the disk through its storage plugin after its VM stopped."""

    def run(spec: str) -> defer.Deferred:
        provider, disk = storage_for(plugins, spec, options)
        return defer.maybeDeferred(provider.release, disk)

    return run
