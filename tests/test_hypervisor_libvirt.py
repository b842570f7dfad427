"""The ``libvirt`` hypervisor plugin against libvirt's real test driver (no mocks).

Hosts come from etc/xenpool/node-host*.xml (2 CPUs, 1024 MB each). The IHypervisor methods
return Deferreds; without a running reactor they are driven by stand-ins: a thread pool that
runs each call at once in the calling thread and a Clock whose callFromThread runs at once.
Lifecycle events come from libvirt's own event thread and are awaited on a queue with a
timeout (a wait for an event, not a sleep).
"""

from __future__ import annotations

import queue
from pathlib import Path

import libvirt
import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from zope.interface.verify import verifyClass, verifyObject

from xenpool.interfaces import DomainSpec, IHypervisor, NodeInfo
from xenpool.plugins import load_plugins
from xenpool_plugins.hypervisor_libvirt import (
    DEFAULT_TEMPLATE_VARS,
    HypervisorError,
    LibvirtHypervisor,
    UnknownDomain,
    cpu_wait_from_stats,
    ips_from_xml,
    mac_tail,
    render_domain_xml,
    stable_uuid,
)

ETC = Path(__file__).resolve().parent.parent / "etc" / "xenpool"
NODES = [ETC / f"node-host{i}.xml" for i in (1, 2, 3)]
TOTAL_KB = 1024 * 1024
OVERHEAD_KB = 12 * 1024 + 7 * 1024  # 12 MB + 7 KB per MB of 1024 MB
EVENT_TIMEOUT_S = 10


def uri(node: Path = NODES[0]) -> str:
    return f"test://{node}"


def disk(name: str) -> str:
    return f"<disk type='file' device='disk'><source file='/var/lib/xenpool/{name}.img'/><target dev='vda'/></disk>"


def spec(
    name: str = "web1",
    ram_mb: int = 256,
    vcpus: int = 1,
    ips: tuple[str, ...] = ("10.0.0.1",),
) -> DomainSpec:
    return DomainSpec(
        name=name, ram_mb=ram_mb, vcpus=vcpus, disk_xml=disk(name), ips=ips
    )


class SyncThreadPool:
    """Runs every call at once, in the calling thread."""

    def callInThreadWithCallback(self, on_result, f, *args, **kwargs):
        try:
            result = f(*args, **kwargs)
        except BaseException:
            on_result(False, Failure())
        else:
            on_result(True, result)


class SyncReactor(Clock):
    """A Clock (callLater, seconds) whose callFromThread runs the call at once."""

    def callFromThread(self, f, *args, **kwargs):
        f(*args, **kwargs)


def result_of(d: Deferred):
    results = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


def failure_of(d: Deferred, exc_type: type[BaseException]) -> BaseException:
    with pytest.raises(exc_type) as info:
        result_of(d)
    return info.value


@pytest.fixture
def reactor():
    return SyncReactor()


@pytest.fixture
def make(reactor):
    made = []

    def make_hypervisor(
        node: Path = NODES[0], cls=LibvirtHypervisor, **options
    ) -> LibvirtHypervisor:
        options.setdefault("threadpool", SyncThreadPool())
        options.setdefault("reactor", reactor)
        hv = cls(uri(node), **options)
        made.append(hv)
        return hv

    yield make_hypervisor
    for hv in made:
        hv.stop()


@pytest.fixture
def hv(make):
    return make()


# -- the plugin ----------------------------------------------------------------------------


def test_found_through_the_plugin_system_and_provides_the_interface():
    plugins = load_plugins()
    assert plugins.get("hypervisor", "libvirt").plugin == "builtin"
    hv = plugins.create(
        "hypervisor",
        "libvirt",
        uri=uri(),
        threadpool=SyncThreadPool(),
        reactor=SyncReactor(),
    )
    try:
        assert isinstance(hv, LibvirtHypervisor)
        assert verifyObject(IHypervisor, hv)
        assert verifyClass(IHypervisor, LibvirtHypervisor)
        assert result_of(hv.node()).cpus == 2
    finally:
        hv.stop()


def test_bad_options_are_refused_by_the_plugin_system():
    from xenpool.plugins import PluginError

    with pytest.raises(PluginError, match="overheads must be >= 0"):
        load_plugins().create("hypervisor", "libvirt", uri=uri(), overhead_mb=-1)
    with pytest.raises(PluginError, match="is not a file"):
        load_plugins().create(
            "hypervisor",
            "libvirt",
            uri=uri(),
            domain_template="/nonexistent/domain.xml",
        )


# -- the host ----------------------------------------------------------------------------------


@pytest.mark.parametrize("node", NODES, ids=lambda p: p.stem)
def test_node_files_describe_the_prototypes_hosts(make, node):
    hv = make(node)
    info = result_of(hv.node())
    assert isinstance(info, NodeInfo)
    assert (info.cpus, info.ram_kb) == (2, TOTAL_KB)
    assert info.hostname  # libvirt's test driver answers with this machine's hostname
    assert result_of(hv.domains()) == {}  # no predefined domains
    assert hv._conn().getType() == "TEST"


def test_hostname_can_be_configured(make):
    assert result_of(make(hostname="host2").node()).hostname == "host2"


def test_an_unreachable_uri_fails_clearly(make, tmp_path):
    hv = make(tmp_path / "missing.xml")
    err = failure_of(hv.node(), HypervisorError)
    assert "cannot connect to test://" in str(err)


def test_free_ram_follows_the_formula_as_vms_start_and_stop(hv):
    free = TOTAL_KB - OVERHEAD_KB
    assert result_of(hv.free_ram_kb()) == free == 1029120
    result_of(hv.start(spec("web1", 256)))
    assert result_of(hv.free_ram_kb()) == free - 256 * 1024
    result_of(hv.start(spec("db1", 512)))
    assert result_of(hv.free_ram_kb()) == free - 768 * 1024 == 242688
    assert result_of(hv.shutdown("web1", 30)) is True
    assert result_of(hv.free_ram_kb()) == free - 512 * 1024
    assert result_of(hv.destroy("db1")) is True
    assert result_of(hv.free_ram_kb()) == free


def test_overhead_is_configurable(make):
    hv = make(overhead_mb=100, overhead_kb_per_mb=0)
    assert hv.overhead_kb(TOTAL_KB) == 100 * 1024
    assert result_of(hv.free_ram_kb()) == TOTAL_KB - 100 * 1024
    assert (
        result_of(make(overhead_mb=0, overhead_kb_per_mb=0).free_ram_kb()) == TOTAL_KB
    )


def test_each_connection_to_a_node_file_is_a_fresh_host(make):
    first, second = make(), make()
    result_of(first.start(spec("web1")))
    assert set(result_of(first.domains())) == {"web1"}
    assert result_of(second.domains()) == {}  # same file, other connection: other host
    first.stop()  # closes the connection: the host and its domains are gone
    assert result_of(first.domains()) == {}


# -- domains -----------------------------------------------------------------------------------


def test_start_two_domains_list_states_and_cpu_time(hv):
    assert result_of(hv.start(spec("web1", 256))) == libvirt.VIR_DOMAIN_RUNNING
    assert result_of(hv.start(spec("db1", 512, vcpus=2))) == libvirt.VIR_DOMAIN_RUNNING
    assert result_of(hv.domains()) == {
        "web1": (libvirt.VIR_DOMAIN_RUNNING, 256 * 1024),
        "db1": (libvirt.VIR_DOMAIN_RUNNING, 512 * 1024),
    }
    assert result_of(hv.state("web1")) == libvirt.VIR_DOMAIN_RUNNING
    cpu = result_of(hv.cpu_time_ns("db1"))
    assert (
        isinstance(cpu, int) and cpu > 0
    )  # the test driver's cpuTime is wall-clock time


def test_domains_lists_only_what_xenpool_started(hv):
    result_of(hv.start(spec("web1", 256)))
    free = result_of(hv.free_ram_kb())
    hv._conn().createXML(  # a domain someone else started on this host, with a UUID of its own
        "<domain type='test'><name>theirs</name><uuid>6d9a4ad2-0c6e-4a1f-9b0a-1f4b2f3c4d5e</uuid>"
        "<memory>131072</memory><vcpu>1</vcpu><os><type>hvm</type></os></domain>",
        0,
    )
    assert set(result_of(hv.domains())) == {
        "web1"
    }  # a PE never holds, adopts or stops it
    assert result_of(hv.free_ram_kb()) == free - 131072  # but its RAM is not free


def test_cpu_wait_is_none_where_the_driver_does_not_report_it(hv):
    result_of(hv.start(spec("web1")))
    assert (
        result_of(hv.cpu_wait_ns("web1")) is None
    )  # the test driver has no vCPU wait counters
    failure_of(hv.cpu_wait_ns("nothere"), UnknownDomain)


@pytest.mark.parametrize(
    "stats, wait",
    [
        (
            {"vcpu.current": 2, "vcpu.0.wait": 5, "vcpu.1.wait": 7, "vcpu.0.time": 100},
            12,
        ),  # Xen
        ({"vcpu.current": 1, "vcpu.0.delay": 40, "vcpu.0.time": 100}, 40),  # QEMU
        ({"vcpu.current": 1, "vcpu.0.time": 100}, None),
        ({}, None),
    ],
    ids=["xen", "qemu", "neither", "empty"],
)
def test_cpu_wait_sums_the_vcpu_wait_or_delay_counters(stats, wait):
    assert cpu_wait_from_stats(stats) == wait


def test_domains_are_transient_and_carry_their_ips(hv):
    result_of(hv.start(spec("web1", ips=("10.0.0.1", "10.0.0.2"))))
    dom = hv._conn().lookupByName("web1")
    assert not dom.isPersistent()
    assert dom.UUIDString() == stable_uuid("web1")
    xml = dom.XMLDesc()
    assert ips_from_xml(xml) == ("10.0.0.1", "10.0.0.2")
    assert "/var/lib/xenpool/web1.img" in xml
    assert "IPs: 10.0.0.1, 10.0.0.2" in xml


def test_shutdown_leaves_nothing_behind(hv):
    result_of(hv.start(spec("web1")))
    assert result_of(hv.shutdown("web1", 5)) is True
    assert result_of(hv.domains()) == {}
    failure_of(hv.state("web1"), UnknownDomain)
    assert hv._conn().listAllDomains() == []  # not even an inactive definition
    assert result_of(hv.shutdown("web1", 5)) is True  # nothing running: nothing to do


def test_destroy(hv):
    result_of(hv.start(spec("web1")))
    assert result_of(hv.destroy("web1")) is True
    assert result_of(hv.domains()) == {}
    assert result_of(hv.destroy("web1")) is False  # idempotent
    failure_of(hv.cpu_time_ns("web1"), UnknownDomain)


def test_a_domain_can_start_again_after_it_stopped(hv):
    result_of(hv.start(spec("web1")))
    result_of(hv.shutdown("web1", 5))
    assert result_of(hv.start(spec("web1"))) == libvirt.VIR_DOMAIN_RUNNING


def test_starting_a_duplicate_name_fails(hv):
    result_of(hv.start(spec("web1", 256)))
    err = failure_of(hv.start(spec("web1", 128)), HypervisorError)
    assert "'web1'" in str(err) and "already exists" in str(err)
    assert result_of(hv.domains()) == {"web1": (libvirt.VIR_DOMAIN_RUNNING, 256 * 1024)}


def test_libvirt_refusing_a_domain_is_a_hypervisor_error(hv):
    err = failure_of(hv.start(spec("bad/name")), HypervisorError)
    assert (
        "cannot start 'bad/name'" in str(err) and err.code == libvirt.VIR_ERR_XML_ERROR
    )


def test_bad_specs_and_bad_disk_xml_fail_before_libvirt(hv):
    failure_of(hv.start(spec("web1", ram_mb=0)), HypervisorError)
    failure_of(hv.start(spec("", ram_mb=1)), HypervisorError)
    broken = DomainSpec("web1", 256, 1, "<disk type='file'><source file='x'/>")
    err = failure_of(hv.start(broken), HypervisorError)
    assert "not well-formed XML" in str(err)
    assert result_of(hv.domains()) == {}


def test_the_test_driver_does_not_refuse_beyond_free_ram(hv):
    # libvirt's test driver overcommits without complaint (KVM would too, until the host
    # swaps or the OOM killer steps in): checking RAM before a start is the PE's job.
    result_of(hv.start(spec("big", ram_mb=4096)))
    assert result_of(hv.domains())["big"] == (libvirt.VIR_DOMAIN_RUNNING, 4096 * 1024)
    assert result_of(hv.free_ram_kb()) == 0  # never negative


def test_the_default_host_and_its_predefined_domain(reactor):
    hv = LibvirtHypervisor(
        "test:///default", threadpool=SyncThreadPool(), reactor=reactor
    )
    try:
        info = result_of(hv.node())
        assert (info.cpus, info.ram_kb) == (16, 3072 * 1024)
        assert (
            result_of(hv.domains()) == {}
        )  # its domain "test" is not one of xenpool's
        test = hv._conn().lookupByName("test")
        assert test.isActive()
        used = test.info()[2]  # but the RAM it uses is not free
        assert (
            result_of(hv.free_ram_kb())
            == info.ram_kb - hv.overhead_kb(info.ram_kb) - used
        )
    finally:
        hv.stop()


# -- shutdown timing, on the reactor's clock ---------------------------------------------------


class DeafGuest(LibvirtHypervisor):
    """A host whose guests ignore the shutdown request (no ACPI, hung guest OS)."""

    def _request_shutdown(self, name):
        return self._is_off(name)


def test_a_guest_that_ignores_shutdown_is_destroyed_after_the_timeout(make, reactor):
    hv = make(cls=DeafGuest)
    result_of(hv.start(spec("web1")))
    d = hv.shutdown("web1", 3.0)
    reactor.pump([0.2] * 14)  # 2.8 s
    assert not d.called
    assert result_of(hv.state("web1")) == libvirt.VIR_DOMAIN_RUNNING
    reactor.pump([0.2] * 2)  # 3.2 s
    assert result_of(d) is False  # had to be destroyed
    assert result_of(hv.domains()) == {}


def test_a_guest_that_shuts_down_late_is_not_destroyed(make, reactor):
    hv = make(cls=DeafGuest)
    result_of(hv.start(spec("web1")))
    d = hv.shutdown("web1", 10.0)
    reactor.pump([0.2] * 5)
    assert not d.called
    hv._conn().lookupByName("web1").shutdown()  # the guest finally powers off by itself
    reactor.advance(0.2)
    assert result_of(d) is True
    assert reactor.seconds() == pytest.approx(1.2)
    assert not reactor.getDelayedCalls()


def test_zero_timeout_destroys_at_once(make):
    hv = make(cls=DeafGuest)
    result_of(hv.start(spec("web1")))
    assert result_of(hv.shutdown("web1", 0)) is False
    assert result_of(hv.domains()) == {}


# -- events ------------------------------------------------------------------------------------


def test_lifecycle_events_arrive(hv):
    events: queue.Queue = queue.Queue()
    assert result_of(hv.watch(lambda name, state: events.put((name, state)))) is True

    def next_event():
        return events.get(timeout=EVENT_TIMEOUT_S)

    result_of(hv.start(spec("web1")))
    assert next_event() == ("web1", libvirt.VIR_DOMAIN_RUNNING)
    result_of(hv.start(spec("db1")))
    assert next_event() == ("db1", libvirt.VIR_DOMAIN_RUNNING)
    result_of(hv.shutdown("web1", 5))
    assert next_event() == ("web1", libvirt.VIR_DOMAIN_SHUTOFF)
    result_of(hv.destroy("db1"))
    assert next_event() == ("db1", libvirt.VIR_DOMAIN_SHUTOFF)
    assert events.empty()


def test_a_failing_watcher_does_not_stop_the_others(hv):
    events: queue.Queue = queue.Queue()

    def broken(name, state):
        raise RuntimeError("boom")

    result_of(hv.watch(broken))
    result_of(hv.watch(lambda name, state: events.put((name, state))))
    result_of(hv.start(spec("web1")))
    assert events.get(timeout=EVENT_TIMEOUT_S) == ("web1", libvirt.VIR_DOMAIN_RUNNING)


# -- the real thread pool ----------------------------------------------------------------------


def test_calls_run_in_the_hypervisors_own_thread_pool(reactor):
    import threading

    hv = LibvirtHypervisor(uri(), reactor=reactor)  # its own ThreadPool
    results: queue.Queue = queue.Queue()
    try:
        assert hv.start() is None  # no spec: start the thread pool
        assert hv.start() is None  # idempotent
        d = hv.start(spec("web1"))  # a spec: start a domain
        d.addBoth(lambda r: results.put((r, threading.current_thread())))
        state, thread = results.get(timeout=EVENT_TIMEOUT_S)
        assert state == libvirt.VIR_DOMAIN_RUNNING
        assert thread is not threading.current_thread()
        hv.domains().addBoth(results.put)
        assert results.get(timeout=EVENT_TIMEOUT_S) == {
            "web1": (libvirt.VIR_DOMAIN_RUNNING, 256 * 1024)
        }
        pool = hv._pool
    finally:
        hv.stop()
    assert not any(t.is_alive() for t in pool.threads)
    hv.stop()  # twice is harmless
    try:  # and it can start again (a fresh pool, a fresh connection: an empty test host)
        hv.domains().addBoth(results.put)
        assert results.get(timeout=EVENT_TIMEOUT_S) == {}
    finally:
        hv.stop()


def test_the_pool_starts_on_first_use(reactor):
    hv = LibvirtHypervisor(uri(), reactor=reactor)
    results: queue.Queue = queue.Queue()
    try:
        hv.node().addBoth(results.put)
        assert results.get(timeout=EVENT_TIMEOUT_S).cpus == 2
    finally:
        hv.stop()


# -- templates ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "template, mac_prefix, bridge",
    [
        ("domain-test.xml", None, None),
        ("domain-kvm.xml", "52:54:00", "br0"),
        ("domain-xen.xml", "00:16:3e", "xenbr0"),
    ],
)
def test_every_template_renders_to_well_formed_domain_xml(template, mac_prefix, bridge):
    import xml.etree.ElementTree as ET

    text = (ETC / template).read_text()
    vm = DomainSpec("web&1", 384, 2, disk("web1"), ("10.0.0.7",))
    xml = render_domain_xml(text, vm, DEFAULT_TEMPLATE_VARS[template])
    root = ET.fromstring(xml)
    assert root.findtext("name") == "web&1"
    assert root.findtext("uuid") == stable_uuid("web&1")
    assert root.findtext("memory") == str(384 * 1024) and root.findtext("vcpu") == "2"
    assert root.find("devices/disk/source").get("file") == "/var/lib/xenpool/web1.img"
    assert ips_from_xml(xml) == ("10.0.0.7",)
    if mac_prefix:
        assert (
            root.find("devices/interface/mac").get("address")
            == f"{mac_prefix}:{mac_tail('web&1')}"
        )
        assert root.find("devices/interface/source").get("bridge") == bridge


def test_template_variables_and_an_explicit_template(make, tmp_path):
    custom = tmp_path / "domain.xml"
    custom.write_text(
        "<domain type='test'><name>${name}</name><description>${bridge}</description>"
        "<memory unit='KiB'>${ram_kb}</memory><vcpu>${vcpus}</vcpu><os><type>hvm</type></os>"
        "<devices>${disk_xml}</devices></domain>"
    )
    hv = make(domain_template=custom, template_vars={"bridge": "vmbr7"})
    assert "<description>vmbr7</description>" in hv.domain_xml(spec("web1"))
    result_of(hv.start(spec("web1")))
    assert (
        "<description>vmbr7</description>" in hv._conn().lookupByName("web1").XMLDesc()
    )


def test_a_template_with_an_unknown_placeholder_fails_clearly(make, tmp_path):
    custom = tmp_path / "domain.xml"
    custom.write_text(
        "<domain type='test'><name>${name}</name><foo>${nosuch}</foo></domain>"
    )
    err = failure_of(make(domain_template=custom).start(spec("web1")), HypervisorError)
    assert "unknown placeholder $nosuch" in str(err)


def test_the_test_driver_cannot_live_migrate_and_says_so(hv):
    from xenpool.interfaces import ILiveMigration, MigrationUnsupported

    assert verifyObject(ILiveMigration, hv)
    result_of(hv.start(spec("web1", 256)))
    assert hv.live_migration is False  # known once connected: the PE does not even try
    err = failure_of(hv.migrate("web1", "test:///default"), MigrationUnsupported)
    assert (
        "migrating 'web1' to test:///default" in str(err)
        and err.code == libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED
    )
    assert result_of(hv.state("web1")) == libvirt.VIR_DOMAIN_RUNNING  # still here
    assert not hv.reactor.getDelayedCalls()  # the abort timer is gone with the answer
