"""twistd plugins for xenpool's daemons. Nothing is imported until a daemon is chosen."""

from twisted.application.service import ServiceMaker


class _Daemon(ServiceMaker):
    """A daemon that cannot start says why in one line (xenpool.config.daemon_service)."""

    def makeService(self, options):
        from xenpool.config import daemon_service

        return daemon_service(
            self.tapname, lambda: super(_Daemon, self).makeService(options), options
        )


xenpoolRegistrar = _Daemon(
    "xenpool registrar",
    "xenpool.registrar.tap",
    "RSerPool pool registrar (ASAP + ENRP)",
    "xenpool-registrar",
)
xenpoolPoolElement = _Daemon(
    "xenpool pool element",
    "xenpool.pe.tap",
    "hypervisor host: starts and watches VMs via libvirt",
    "xenpool-pe",
)
xenpoolPoolUser = _Daemon(
    "xenpool pool user",
    "xenpool.pu.tap",
    "keeper that holds VMs available across host failures",
    "xenpool-pu",
)
