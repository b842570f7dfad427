"""The ``libvirt`` hypervisor: a pool element's host, reached through one libvirt connection.

Any libvirt URI works, opened with ``libvirt.open(uri)``: ``test:///default`` (libvirt's
built-in test driver), ``test:///ABS/PATH/node.xml`` (the test driver with a host described
by a node file, see ``etc/xenpool/node-host1.xml``), ``qemu:///system`` (KVM),
``xen:///system`` and remote URIs (``qemu+ssh://host/system``, ...).

Threads. libvirt calls block, so every ``IHypervisor`` method hands its work to a small
thread pool of its own (``deferToThreadPool``) and returns a Deferred that fires on the
reactor thread. The blocking halves are plain methods (``_node``, ``_free_ram_kb``,
``_domains``, ``_start``, ``_state``, ``_cpu_time_ns``, ``_request_shutdown``, ``_is_off``,
``_destroy``, ``_migrate``) that may be called directly from any thread but the reactor's.

``start()`` (no argument) starts the pool and ``stop()`` stops it and closes the
connection; ``start(spec)`` is ``IHypervisor.start`` and starts a domain. The first call
starts the pool anyway, and with a pool of its own it is stopped at reactor shutdown.

One connection for the hypervisor's life. It is opened on first use. The test driver keeps
its whole host (domains, states) inside the connection: every ``open()`` of
``test:///PATH/node.xml`` gives a fresh, empty host, and ``test:///default`` is one host
shared by all the process's connections to it while any is open. So a PE must keep this object (and thus the
connection) for its whole life and never open a second one to "look"; a lost remote
connection is reopened (events re-registered), a test connection never is.

Domains are transient (``createXML``): started from the XML alone, never defined on the
host. When one stops (shut down, destroyed, crashed) libvirt forgets it: nothing is left to
undefine, and above all nothing a rebooted, fenced host could autostart while the VM runs
elsewhere. The VM's definition lives with the pool user (the request and the cookie), not on
a host.

Free RAM follows the prototype (docs/load-study.md, "The model"): total - hypervisor overhead
(``overhead_mb`` + ``overhead_kb_per_mb`` per MB of total RAM; 12 MB + 7 KB/MB was the
prototype's Xen) - the current memory of every active domain (Xen's Domain-0 included, as
the domain with ID 0). ``conn.getFreeMemory()`` is not used: the test driver answers 0
for a node file host, and it says nothing of the RAM promised to running guests anyway.
"""

from __future__ import annotations

import hashlib
import os
import threading
import uuid as uuidlib
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from string import Template
from typing import Any, overload
from xml.sax.saxutils import escape

import libvirt
from twisted.internet import defer, task
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from xenpool.interfaces import (
    DomainSpec,
    IHypervisor,
    ILiveMigration,
    MigrationUnsupported,
    NodeInfo,
)
from xenpool.plugins import global_reactor

log = Logger()

#: Namespace of the <metadata> element that carries a VM's IPs.
METADATA_NS = "urn:xenpool:vm:1"
#: Base of the stable domain UUIDs (uuid5 of the VM name): a VM keeps its UUID across hosts.
UUID_NAMESPACE = uuidlib.UUID("5f0c63c2-8a7e-4b8e-9a55-3d6c1f0e2b71")

#: Driver type (conn.getType(), lower case) -> template file name.
TEMPLATE_FILES = {
    "test": "domain-test.xml",
    "qemu": "domain-kvm.xml",
    "kvm": "domain-kvm.xml",
    "xen": "domain-xen.xml",
    "libxl": "domain-xen.xml",
}
#: Template variables each template gets unless ``template_vars`` overrides them.
DEFAULT_TEMPLATE_VARS = {
    "domain-test.xml": {"bridge": "br0"},
    "domain-kvm.xml": {"bridge": "br0"},
    "domain-xen.xml": {"bridge": "xenbr0"},
}

# Lifecycle event -> the domain state it leaves the domain in. DEFINED and UNDEFINED are
# left out: they change a domain's configuration, not whether it runs.
EVENT_STATES = {
    libvirt.VIR_DOMAIN_EVENT_STARTED: libvirt.VIR_DOMAIN_RUNNING,
    libvirt.VIR_DOMAIN_EVENT_SUSPENDED: libvirt.VIR_DOMAIN_PAUSED,
    libvirt.VIR_DOMAIN_EVENT_RESUMED: libvirt.VIR_DOMAIN_RUNNING,
    libvirt.VIR_DOMAIN_EVENT_STOPPED: libvirt.VIR_DOMAIN_SHUTOFF,
    libvirt.VIR_DOMAIN_EVENT_SHUTDOWN: libvirt.VIR_DOMAIN_SHUTDOWN,
    libvirt.VIR_DOMAIN_EVENT_PMSUSPENDED: libvirt.VIR_DOMAIN_PMSUSPENDED,
    libvirt.VIR_DOMAIN_EVENT_CRASHED: libvirt.VIR_DOMAIN_CRASHED,
}


class HypervisorError(Exception):
    """A hypervisor operation that failed; the message says what and why.

    ``code`` is libvirt's error code (``libvirt.VIR_ERR_*``) when libvirt refused, else None.
    """

    def __init__(self, reason: str, code: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


class UnknownDomain(HypervisorError, LookupError):
    """No domain of that name is active or defined on this host."""


# -- process-wide libvirt set-up ----------------------------------------------------------


def ensure_event_loop() -> None:
    """Register libvirt's default event implementation and run it in a daemon thread,
    once per process. Needed for domain events and for keepalives on remote connections;
    it must happen before the connections are opened. Another libvirt user in the same
    process (a libvirt STONITH plugin, say) should call this too rather than run its own loop.

    It also installs a silent libvirt error handler: libvirt otherwise prints every error,
    even an expected "no such domain", to stderr. Errors still raise libvirtError.

    The once-per-process guard lives on the ``libvirt`` module, not this one, so that it
    holds even when this module is imported under two names (``xenpool_plugins.*`` and
    ``plugins.*`` from a checkout).
    """
    lock = libvirt.__dict__.setdefault("_xenpool_event_loop_lock", threading.Lock())
    with lock:
        if libvirt.__dict__.get("_xenpool_event_loop_thread") is not None:
            return
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
        if (
            libvirt.virEventRegisterDefaultImpl() < 0
        ):  # pragma: no cover - libvirt raises
            raise HypervisorError("cannot register libvirt's default event loop")

        def run() -> None:
            while True:
                if libvirt.virEventRunDefaultImpl() < 0:  # pragma: no cover
                    log.error("libvirt event loop iteration failed")

        thread = threading.Thread(target=run, name="libvirt-events", daemon=True)
        thread.start()
        libvirt._xenpool_event_loop_thread = thread


# -- domain XML -----------------------------------------------------------------------------


def template_dirs() -> list[Path]:
    """Where domain templates are looked up, first match wins: ``$XENPOOL_ETC``, the source
    tree's etc/xenpool (editable installs and checkouts), /etc/xenpool, and the ones
    shipped in the package (``xenpool.etc``, a non-editable install)."""
    dirs = []
    if os.environ.get("XENPOOL_ETC"):
        dirs.append(Path(os.environ["XENPOOL_ETC"]))
    source = Path(__file__).resolve().parent.parent / "etc" / "xenpool"
    if source.is_dir():
        dirs.append(source)
    dirs.append(Path("/etc/xenpool"))
    shipped = shipped_dir()
    if shipped is not None and shipped not in dirs:
        dirs.append(shipped)
    return dirs


def shipped_dir() -> Path | None:
    """The directory of the package data ``xenpool.etc`` (None if it is not installed)."""
    import importlib.resources

    try:
        path = Path(str(importlib.resources.files("xenpool.etc")))
    except (ModuleNotFoundError, TypeError):
        return None
    return path.resolve() if path.is_dir() else None


def stable_uuid(name: str) -> str:
    return str(uuidlib.uuid5(UUID_NAMESPACE, name))


def mac_tail(name: str) -> str:
    """Three hex bytes from the VM's name, for a MAC address that survives failover."""
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return ":".join(f"{b:02x}" for b in digest[:3])


def metadata_xml(spec: DomainSpec) -> str:
    ips = "".join(f"<xenpool:ip>{escape(ip)}</xenpool:ip>" for ip in spec.ips)
    return f"<xenpool:vm xmlns:xenpool='{METADATA_NS}'>{ips}</xenpool:vm>"


def render_domain_xml(
    template: str, spec: DomainSpec, extra: dict[str, str] | None = None
) -> str:
    """Fill a domain template (string.Template) for ``spec``; a pure function.

    Raises HypervisorError for a bad spec, a template naming an unknown placeholder, or a
    result that is not well-formed XML (a broken ``disk_xml``, typically).
    """
    if not spec.name or spec.name != spec.name.strip():
        raise HypervisorError(f"bad domain name {spec.name!r}")
    if spec.ram_mb <= 0 or spec.vcpus <= 0:
        raise HypervisorError(
            f"domain {spec.name!r}: RAM and vCPUs must be > 0, got {spec.ram_mb} MB, {spec.vcpus}"
        )
    ips = ", ".join(spec.ips) if spec.ips else "none"
    values = dict(extra or {})
    values.update(
        name=escape(spec.name),
        uuid=stable_uuid(spec.name),
        description=escape(f"xenpool VM {spec.name}; IPs: {ips}"),
        metadata=metadata_xml(spec),
        ram_kb=str(spec.ram_mb * 1024),
        ram_mb=str(spec.ram_mb),
        vcpus=str(spec.vcpus),
        disk_xml=spec.disk_xml,
        mac_tail=mac_tail(spec.name),
    )
    try:
        xml = Template(template).substitute(values)
    except KeyError as err:
        raise HypervisorError(
            f"domain template uses unknown placeholder ${err.args[0]}"
        ) from None
    except ValueError as err:
        raise HypervisorError(f"bad domain template: {err}") from None
    try:
        ET.fromstring(xml)
    except ET.ParseError as err:
        raise HypervisorError(
            f"domain {spec.name!r}: the filled template is not well-formed XML ({err})"
        ) from None
    return xml


def ips_from_xml(xml: str) -> tuple[str, ...]:
    """The IPs a domain's XML (``dom.XMLDesc()``) carries in its xenpool metadata."""
    root = ET.fromstring(xml)
    return tuple(e.text or "" for e in root.iter(f"{{{METADATA_NS}}}ip"))


def _reason(err: libvirt.libvirtError) -> str:
    return err.get_error_message() or str(err)


def _failed(what: str, err: libvirt.libvirtError) -> HypervisorError:
    """HypervisorError("WHAT: libvirt's reason"), keeping libvirt's error code."""
    return HypervisorError(f"{what}: {_reason(err)}", err.get_error_code())


# -- the hypervisor ----------------------------------------------------------------------------


def cpu_wait_from_stats(stats: dict) -> int | None:
    """Sum of the per-vCPU wait (Xen) or delay (QEMU) counters in a VIR_DOMAIN_STATS_VCPU
    record, in ns; None if it has neither."""
    waits = [
        int(v)
        for k, v in stats.items()
        if k.startswith("vcpu.") and k.endswith((".wait", ".delay"))
    ]
    return sum(waits) if waits else None


#: libvirt's answers for "this driver (or this pair of hosts) cannot migrate".
UNSUPPORTED_CODES = {libvirt.VIR_ERR_NO_SUPPORT, libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED}
#: Peer to peer: the source libvirtd opens the destination URI itself, so the PE needs
#: no connection to the other host and its credentials live with the libvirt daemons.
MIGRATE_FLAGS = libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER


class MigrationFailed(HypervisorError):
    """A live migration that did not happen; ``code`` as in HypervisorError."""


class LibvirtMigrationUnsupported(MigrationFailed, MigrationUnsupported):
    """libvirt said this driver (or pair of hosts) cannot live-migrate."""


@implementer(IHypervisor, ILiveMigration)
class LibvirtHypervisor:
    """``IHypervisor`` through libvirt; see the module docstring for threads and connections.

    Options: ``uri``; ``threadpool`` and ``reactor`` (default: a pool of its own with up to
    ``max_threads`` threads, and the global reactor); ``domain_template`` (a template file,
    else one chosen by driver type from ``template_dirs()``); ``overhead_mb`` and
    ``overhead_kb_per_mb`` (the hypervisor's own RAM); ``hostname`` (the host identity
    ``node()`` reports; default libvirt's ``getHostname()``, which for the test driver is
    this machine's name whatever the node file); ``template_vars`` (extra or overriding
    template placeholders, such as ``bridge``); ``migration_timeout_s`` (a live migration
    still running after this long is aborted: a guest dirtying memory faster than it can be
    copied never converges; 30 s stays within the rebalancing leader's wait for the answer).
    """

    #: Seconds between state checks while waiting for a guest to shut down.
    poll_interval_s = 0.2

    def __init__(
        self,
        uri: str = "test:///default",
        *,
        threadpool: Any = None,
        reactor: Any = None,
        domain_template: str | os.PathLike[str] | None = None,
        overhead_mb: float = 12.0,
        overhead_kb_per_mb: float = 7.0,
        hostname: str | None = None,
        template_vars: dict[str, str] | None = None,
        max_threads: int = 4,
        migration_timeout_s: float = 30.0,
    ) -> None:
        if overhead_mb < 0 or overhead_kb_per_mb < 0:
            raise ValueError(
                f"overheads must be >= 0, got {overhead_mb} MB + {overhead_kb_per_mb} KB/MB"
            )
        self.uri = uri
        self.migration_timeout_s = float(migration_timeout_s)
        self.overhead_mb = float(overhead_mb)
        self.overhead_kb_per_mb = float(overhead_kb_per_mb)
        self.hostname = hostname
        self.template_vars = dict(template_vars or {})
        self.domain_template = (
            Path(domain_template) if domain_template is not None else None
        )
        if self.domain_template is not None and not self.domain_template.is_file():
            raise ValueError(
                f"domain template {str(self.domain_template)!r} is not a file"
            )
        self._own_pool = threadpool is None
        self._max_threads = max_threads
        self._pool = threadpool if threadpool is not None else self._new_pool()
        self._reactor = reactor
        self._pool_started = False
        self._shutdown_trigger: Any = None
        self._lock = threading.RLock()
        self._connection: libvirt.virConnect | None = None
        self._driver_type: str | None = None
        self._templates: dict[str, tuple[str, dict[str, str]]] = {}
        self._watchers: list[Callable[[str, int], object]] = []
        self._event_id: int | None = None

    # -- life cycle --------------------------------------------------------------------

    @property
    def reactor(self) -> Any:
        if self._reactor is None:
            self._reactor = global_reactor()
        return self._reactor

    def open(self) -> None:
        """``IHypervisor.open``: start the thread pool (idempotent; the first hypervisor
        call does it anyway) and, with a pool of its own, arrange ``close()`` at reactor
        shutdown."""
        self._start_pool()

    @overload
    def start(self, spec: DomainSpec) -> defer.Deferred: ...

    @overload
    def start(self, spec: None = None) -> None: ...

    def start(self, spec: DomainSpec | None = None) -> defer.Deferred | None:
        """``IHypervisor.start``: start ``spec`` as a transient domain from the template.
        The Deferred fires with its state (``VIR_DOMAIN_RUNNING``) or fails with
        HypervisorError if it cannot be started.

        ``start()`` without a spec is the old name of ``open()`` (returns None), kept for
        callers from before the lifecycle had names of its own.
        """
        if spec is not None:
            return self._defer(self._start, spec)
        self.open()
        return None

    def _new_pool(self) -> ThreadPool:
        return ThreadPool(1, self._max_threads, name=f"libvirt {self.uri}")

    def _start_pool(self) -> None:
        if self._pool_started:
            return
        self._pool_started = True
        if self._own_pool:
            self._pool.start()
            add_trigger = getattr(self.reactor, "addSystemEventTrigger", None)
            if add_trigger is not None:
                self._shutdown_trigger = add_trigger("during", "shutdown", self.close)

    def stop(self) -> None:
        """The same as ``close()``."""
        self.close()

    def close(self) -> None:
        """``IHypervisor.close``: stop the thread pool (waits for calls in progress), drop the event registration
        and close the connection. Blocks briefly; meant for shutdown. A later call opens a
        new connection, which for a test driver URI is a new, empty host."""
        if self._own_pool and self._pool_started:
            self._pool.stop()
            self._pool = self._new_pool()  # a stopped ThreadPool does not start again
        self._pool_started = False
        if self._shutdown_trigger is not None:
            try:
                self.reactor.removeSystemEventTrigger(self._shutdown_trigger)
            except (ValueError, KeyError, TypeError):  # already fired
                pass
            self._shutdown_trigger = None
        with self._lock:
            conn, self._connection = self._connection, None
            event_id, self._event_id = self._event_id, None
        if conn is not None:
            try:
                if event_id is not None:
                    conn.domainEventDeregisterAny(event_id)
                conn.close()
            except libvirt.libvirtError as err:
                log.warn(
                    "closing libvirt connection {uri}: {reason}",
                    uri=self.uri,
                    reason=_reason(err),
                )

    def _defer(self, f: Callable[..., Any], *args: Any) -> defer.Deferred:
        self._start_pool()
        return deferToThreadPool(self.reactor, self._pool, f, *args)

    # -- IHypervisor ----------------------------------------------------------------------

    def node(self) -> defer.Deferred:
        """NodeInfo(hostname, cpus, ram_kb)."""
        return self._defer(self._node)

    def node_info(self) -> NodeInfo:
        """``IHypervisor.node_info``: the node, blocking (connects if needed). Also checks
        that this driver's domain template can be read: a PE calls this once at start, and
        refuses to start without a template rather than fail every create."""
        node = self._node()
        self._template()
        return node

    def free_ram_kb(self) -> defer.Deferred:
        """KB left for new guests (never below 0)."""
        return self._defer(self._free_ram_kb)

    def domains(self) -> defer.Deferred:
        """{name: (state, ram_kb)} of the active guests xenpool started (their UUID is the
        one xenpool derives from the name). Other domains on the host, Xen's Domain-0
        among them, are never held, adopted or shut down by a PE; their RAM still counts
        in ``free_ram_kb``."""
        return self._defer(self._domains)

    def state(self, name: str) -> defer.Deferred:
        """The libvirt state (``VIR_DOMAIN_*``); fails with UnknownDomain."""
        return self._defer(self._state, name)

    def cpu_time_ns(self, name: str) -> defer.Deferred:
        return self._defer(self._cpu_time_ns, name)

    def cpu_wait_ns(self, name: str) -> defer.Deferred:
        """The domain's cumulative time runnable but waiting for a host core (Xen's
        ``vcpu.N.wait``, QEMU's ``vcpu.N.delay``), summed over its vCPUs; None when the
        driver does not report it. With it a PE measures CPU demand, not just CPU received."""
        return self._defer(self._cpu_wait_ns, name)

    def destroy(self, name: str) -> defer.Deferred:
        """Stop the domain at once. Fires True if it was running, False if there was nothing
        to stop (idempotent: a domain already gone is not an error)."""
        return self._defer(self._destroy, name)

    def shutdown(self, name: str, timeout_s: float) -> defer.Deferred:
        """Ask the guest to shut down, checking every ``poll_interval_s`` on the reactor's
        clock; destroy it if it is still up after ``timeout_s`` or if the request itself
        failed. Fires True for a clean shutdown (or nothing running), False if it had to be
        destroyed. Never holds a pool thread while waiting."""
        return defer.ensureDeferred(self._shutdown(name, float(timeout_s)))

    @property
    def live_migration(self) -> bool:
        """False for libvirt's test driver (which has no migration); any other driver is
        tried, and one that refuses raises MigrationUnsupported."""
        return (self._driver_type or "").upper() != "TEST"

    def migrate(self, name: str, destination_uri: str) -> defer.Deferred:
        """``ILiveMigration.migrate``: live, peer to peer, the domain staying transient on
        the destination (as it was started here). Aborted after ``migration_timeout_s``
        (libvirt then resumes it here). Fails with MigrationFailed, or with
        LibvirtMigrationUnsupported where libvirt cannot migrate."""
        done = self._defer(self._migrate, name, destination_uri)
        abort = self.reactor.callLater(
            self.migration_timeout_s, self._defer, self._abort_job, name
        )

        def finished(result: Any) -> Any:
            if abort.active():
                abort.cancel()
            return result

        return done.addBoth(finished)

    def watch(self, callback: Callable[[str, int], object]) -> defer.Deferred:
        """Call ``callback(name, state)`` on the reactor thread for every lifecycle event
        (state as ``VIR_DOMAIN_*``: STARTED -> RUNNING, STOPPED -> SHUTOFF, SHUTDOWN ->
        SHUTDOWN, CRASHED -> CRASHED, SUSPENDED -> PAUSED, ...). The returned Deferred
        (safe to ignore) fires True once events are registered, False where the driver has
        none: then polling ``state()`` is all there is."""
        self._watchers.append(callback)
        d = self._defer(self._watch_events)

        def failed(failure: Any) -> bool:
            log.warn(
                "no libvirt domain events from {uri}: {reason}",
                uri=self.uri,
                reason=failure.getErrorMessage(),
            )
            return False

        return d.addErrback(failed)

    # -- blocking halves (any thread but the reactor's) -----------------------------------

    def _conn(self) -> libvirt.virConnect:
        with self._lock:
            conn = self._connection
            if conn is not None and not self.uri.startswith("test:"):
                try:
                    alive = conn.isAlive()
                except libvirt.libvirtError:
                    alive = False
                if not alive:
                    log.warn("libvirt connection {uri} lost; reopening", uri=self.uri)
                    try:
                        conn.close()
                    except libvirt.libvirtError:
                        pass
                    conn = self._connection = None
                    self._event_id = None
            if conn is None:
                ensure_event_loop()
                try:
                    conn = libvirt.open(self.uri)
                except libvirt.libvirtError as err:
                    raise _failed(f"cannot connect to {self.uri}", err) from None
                self._connection = conn
                self._driver_type = conn.getType()
                if self._watchers:
                    self._register_events(conn)
            return conn

    @property
    def measures_cpu(self) -> bool:
        """False for libvirt's test driver, whose cpuTime is wall-clock time, not load:
        a PE then keeps each VM's estimate instead of sampling it."""
        return (self._driver_type or "").upper() != "TEST"

    def _lookup(self, name: str) -> libvirt.virDomain:
        try:
            return self._conn().lookupByName(name)
        except libvirt.libvirtError as err:
            if err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                raise UnknownDomain(
                    f"no domain {name!r} on {self.uri}", err.get_error_code()
                ) from None
            raise _failed(f"looking up domain {name!r}", err) from None

    def overhead_kb(self, total_kb: int) -> int:
        """The hypervisor's own RAM for a host with ``total_kb`` KB."""
        return round(
            self.overhead_mb * 1024 + self.overhead_kb_per_mb * total_kb / 1024
        )

    def _node(self) -> NodeInfo:
        conn = self._conn()
        try:
            info = (
                conn.getInfo()
            )  # [model, memory MB, cpus, mhz, nodes, sockets, cores, threads]
            hostname = self.hostname or conn.getHostname()
        except libvirt.libvirtError as err:
            raise _failed(f"node info from {self.uri}", err) from None
        return NodeInfo(
            hostname=hostname, cpus=int(info[2]), ram_kb=int(info[1]) * 1024
        )

    def _active(self) -> list[tuple[str, str, int, int]]:
        """(name, UUID, state, current RAM KB) of every active domain, Domain-0 included."""
        try:
            doms = self._conn().listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
        except libvirt.libvirtError as err:
            raise _failed(f"listing domains on {self.uri}", err) from None
        result = []
        for dom in doms:
            try:
                info = dom.info()  # [state, max KB, current KB, vcpus, cpu time ns]
                result.append(
                    (dom.name(), dom.UUIDString(), int(info[0]), int(info[2]))
                )
            except libvirt.libvirtError as err:
                if (
                    err.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN
                ):  # gone meanwhile: skip
                    raise _failed(f"domain info on {self.uri}", err) from None
        return result

    def _free_ram_kb(self) -> int:
        total_kb = self._node().ram_kb
        used = sum(ram_kb for _name, _uuid, _state, ram_kb in self._active())
        return max(0, total_kb - self.overhead_kb(total_kb) - used)

    def _domains(self) -> dict[str, tuple[int, int]]:
        return {
            name: (state, ram_kb)
            for name, uuid, state, ram_kb in self._active()
            if uuid == stable_uuid(name)
        }

    def _template(self) -> tuple[str, dict[str, str]]:
        """The domain template text for this connection's driver, and its default vars."""
        self._conn()
        driver = (self._driver_type or "").lower()
        if self.domain_template is not None:
            path = self.domain_template
        else:
            filename = TEMPLATE_FILES.get(driver)
            if filename is None:
                raise HypervisorError(
                    f"no domain template for libvirt driver {self._driver_type!r}; pass domain_template=PATH"
                )
            candidates = [d / filename for d in template_dirs()]
            found = next((p for p in candidates if p.is_file()), None)
            if found is None:
                raise HypervisorError(
                    f"domain template {filename} not found in {', '.join(map(str, template_dirs()))}"
                )
            path = found
        key = str(path)
        if key not in self._templates:
            try:
                text = path.read_text(encoding="utf-8")
            except OSError as err:
                raise HypervisorError(
                    f"cannot read domain template {key}: {err.strerror}"
                ) from None
            self._templates[key] = (
                text,
                dict(DEFAULT_TEMPLATE_VARS.get(path.name, {"bridge": "br0"})),
            )
        return self._templates[key]

    def domain_xml(self, spec: DomainSpec) -> str:
        """The XML ``_start`` would hand to libvirt (blocking: may open the connection)."""
        text, defaults = self._template()
        return render_domain_xml(text, spec, {**defaults, **self.template_vars})

    def _start(self, spec: DomainSpec) -> int:
        """Start ``spec`` as a transient domain; returns its state. Raises HypervisorError
        (a name already in use, a template or XML problem, libvirt refusing)."""
        xml = self.domain_xml(spec)
        conn = self._conn()
        try:
            existing = conn.lookupByName(spec.name)
        except libvirt.libvirtError as err:
            if err.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                raise _failed(f"looking up domain {spec.name!r}", err) from None
        else:
            active = "running" if existing.isActive() else "defined, not running"
            raise HypervisorError(
                f"cannot start {spec.name!r}: a domain of that name already exists ({active})"
            )
        try:
            dom = conn.createXML(xml, 0)
            return int(dom.state()[0])
        except libvirt.libvirtError as err:
            raise _failed(f"cannot start {spec.name!r} on {self.uri}", err) from None

    def _state(self, name: str) -> int:
        dom = self._lookup(name)
        try:
            return int(dom.state()[0])
        except libvirt.libvirtError as err:
            if err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                raise UnknownDomain(
                    f"no domain {name!r} on {self.uri}", err.get_error_code()
                ) from None
            raise _failed(f"state of {name!r}", err) from None

    def _cpu_time_ns(self, name: str) -> int:
        dom = self._lookup(name)
        try:
            return int(dom.info()[4])
        except libvirt.libvirtError as err:
            if err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                raise UnknownDomain(
                    f"no domain {name!r} on {self.uri}", err.get_error_code()
                ) from None
            raise _failed(f"CPU time of {name!r}", err) from None

    def _cpu_wait_ns(self, name: str) -> int | None:
        dom = self._lookup(name)
        try:
            [(_, stats)] = self._conn().domainListGetStats(
                [dom], libvirt.VIR_DOMAIN_STATS_VCPU
            )
        except libvirt.libvirtError as err:
            if err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                raise UnknownDomain(
                    f"no domain {name!r} on {self.uri}", err.get_error_code()
                ) from None
            raise _failed(f"vCPU statistics of {name!r}", err) from None
        return cpu_wait_from_stats(stats)

    def _migrate(self, name: str, destination_uri: str) -> None:
        dom = self._lookup(name)
        try:
            dom.migrateToURI3(destination_uri, {}, MIGRATE_FLAGS)
        except libvirt.libvirtError as err:
            failure = (
                LibvirtMigrationUnsupported
                if err.get_error_code() in UNSUPPORTED_CODES
                else MigrationFailed
            )
            raise failure(
                f"migrating {name!r} to {destination_uri}: {_reason(err)}",
                err.get_error_code(),
            ) from None

    def _abort_job(self, name: str) -> None:
        try:
            self._lookup(name).abortJob()
            log.warn(
                "live migration of {name} still running after {s} s: aborted",
                name=name,
                s=self.migration_timeout_s,
            )
        except (HypervisorError, libvirt.libvirtError):
            pass  # it finished (or ended) meanwhile

    def _is_off(self, name: str) -> bool:
        """True if the domain is gone or shut off."""
        try:
            return self._state(name) == libvirt.VIR_DOMAIN_SHUTOFF
        except UnknownDomain:
            return True

    def _request_shutdown(self, name: str) -> bool:
        """Ask the guest to shut down; True if it is already off afterwards (or was never
        there). Raises HypervisorError if the request could not be made."""
        try:
            dom = self._lookup(name)
        except UnknownDomain:
            return True
        try:
            if not dom.isActive():
                return True
            dom.shutdown()
        except libvirt.libvirtError as err:
            if self._is_off(name):  # it stopped by itself meanwhile
                return True
            raise _failed(f"cannot ask {name!r} to shut down", err) from None
        return self._is_off(name)

    def _destroy(self, name: str) -> bool:
        """Destroy the domain; True if it was running, False if nothing was."""
        try:
            dom = self._lookup(name)
        except UnknownDomain:
            return False
        try:
            if not dom.isActive():
                return False
            dom.destroy()
        except libvirt.libvirtError as err:
            if self._is_off(name):
                return False
            raise _failed(f"cannot destroy {name!r}", err) from None
        return True

    async def _shutdown(self, name: str, timeout_s: float) -> bool:
        reactor = self.reactor
        deadline = reactor.seconds() + timeout_s
        try:
            if await self._defer(self._request_shutdown, name):
                return True
        except UnknownDomain:
            return True
        except HypervisorError as err:
            log.warn("{reason}; destroying it", reason=err.reason)
            await self._defer(self._destroy, name)
            return False
        while reactor.seconds() < deadline:
            delay = min(self.poll_interval_s, deadline - reactor.seconds())
            await task.deferLater(reactor, delay, lambda: None)
            if await self._defer(self._is_off, name):
                return True
        log.info(
            "domain {name} still up {timeout}s after the shutdown request; destroying it",
            name=name,
            timeout=timeout_s,
        )
        await self._defer(self._destroy, name)
        return False

    # -- events ----------------------------------------------------------------------------

    def _watch_events(self) -> bool:
        conn = self._conn()
        with self._lock:
            if self._event_id is None:
                self._register_events(conn)
        return True

    def _register_events(self, conn: libvirt.virConnect) -> None:
        try:
            self._event_id = conn.domainEventRegisterAny(
                None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, None
            )
        except libvirt.libvirtError as err:
            raise _failed(f"domain events on {self.uri}", err) from None

    def _on_lifecycle(
        self, _conn: Any, dom: Any, event: int, detail: int, _opaque: Any
    ) -> None:
        """libvirt's callback, on the libvirt event thread: hand over to the reactor."""
        state = EVENT_STATES.get(event)
        if state is None:
            return
        self.reactor.callFromThread(self._dispatch, dom.name(), state)

    def _dispatch(self, name: str, state: int) -> None:
        for callback in list(self._watchers):
            try:
                callback(name, state)
            except Exception:
                log.failure(
                    "domain event callback {callback!r} failed", callback=callback
                )
