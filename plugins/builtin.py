"""The built-in plugins, registered through the ``xenpool`` entry point like any other."""

from __future__ import annotations

from xenpool.hookspecs import hookimpl

from . import load, policies


@hookimpl
def xenpool_register_load_metrics(register):
    register("max", load.MaxLoad)
    register("cpu", load.CpuLoad)
    register("weighted", load.WeightedLoad)


@hookimpl
def xenpool_register_pool_policies(register):
    for name, policy in policies.POLICIES.items():
        register(name, policy)


@hookimpl
def xenpool_register_hypervisors(register):
    # Imported here, not at the top: without libvirt-python (or libvirt's C library) the
    # other built-ins still load, only the "libvirt" hypervisor is missing.
    try:
        from . import hypervisor_libvirt
    except ImportError:
        return
    register("libvirt", hypervisor_libvirt.LibvirtHypervisor)


@hookimpl
def xenpool_register_storage(register):
    from . import storage

    for provider in storage.PROVIDERS:
        register(provider.name, provider)


@hookimpl
def xenpool_register_stonith(register):
    # No libvirt import at load time: the "libvirt" provider imports it when it is created.
    from . import stonith

    for factory in stonith.PROVIDERS:
        register(factory.name, factory)


@hookimpl
def xenpool_register_rebalancers(register):
    from . import rebalance

    register("hot-cold", rebalance.HotToCold)
    register("gap-fit", rebalance.GapFit)
    register("plan", rebalance.PlannedMoves)
