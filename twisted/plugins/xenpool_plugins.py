"""twistd plugins for xenpool's daemons. Nothing is imported until a daemon is chosen."""

from twisted.application.service import ServiceMaker

xenpoolRegistrar = ServiceMaker(
    "xenpool registrar",
    "xenpool.registrar.tap",
    "RSerPool pool registrar (ASAP + ENRP)",
    "xenpool-registrar",
)
xenpoolPoolElement = ServiceMaker(
    "xenpool pool element",
    "xenpool.pe.tap",
    "hypervisor host: starts and watches VMs via libvirt",
    "xenpool-pe",
)
xenpoolPoolUser = ServiceMaker(
    "xenpool pool user",
    "xenpool.pu.tap",
    "keeper that holds VMs available across host failures",
    "xenpool-pu",
)
