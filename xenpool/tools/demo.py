"""``xenpool demo --protocol``: the wire protocol at work, in-process and in real bytes.

It walks through what a PE, a PU and a registrar say to each other (the plugins found,
ASAP and session messages, the cookie) and what happens to bad input. ``make demo``
(``xenpool demo``) runs the daemons themselves: ``cluster_demo``.
"""

from __future__ import annotations

import time
from typing import cast

from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from .. import __version__
from ..interfaces import LoadSample
from ..plugins import KINDS, load_plugins
from ..protocol import cookie, framing, messages, params, session
from ..protocol.errors import ProtocolError
from . import samples


def _hex(data: bytes, width: int = 32) -> str:
    return "\n".join(data[i : i + width].hex(" ") for i in range(0, len(data), width))


def _transport(t: params.Transport) -> str:
    kind = type(t).__name__.removesuffix("Transport").upper()
    return f"{kind} {','.join(t.addresses)}:{t.port}"


def run(console: Console | None = None) -> int:
    console = console or Console()
    console.rule(
        f"[bold]xenpool {__version__}[/bold]: highly available VMs on Reliable Server Pooling"
    )
    console.print(
        "The messages the daemons exchange, in-process: the RSerPool wire protocol (ASAP, ENRP), the "
        "PE<->PU session messages, the authenticated session cookie, and the plugin system. "
        "`xenpool demo` runs the daemons themselves.\n"
    )

    # 1. Plugins
    plugins = load_plugins()
    table = Table(title="1. Plugins found through the 'xenpool' entry points")
    for column in ("kind", "name", "from plugin"):
        table.add_column(column)
    for kind in KINDS:
        for provider in plugins.providers(kind):
            table.add_row(kind, provider.name, provider.plugin)
    console.print(table)
    sample = LoadSample(cpu=0.60, ram=0.80)
    loads = ", ".join(
        f"{name} = {plugins.create('load', name).load(sample):.2f}"
        for name in plugins.names("load")
    )
    console.print(f"A host at 60 % CPU and 80 % RAM reports: {loads}\n")

    # 2. A PE registers
    pe = samples.pool_element(
        0x1001, 5001, load=plugins.create("load", "weighted").load(sample)
    )
    registration = messages.encode(messages.Registration(b"Xen", pe))
    console.print(
        Panel(
            _hex(registration),
            title=f"2. PE 0x1001 registers in pool 'Xen': ASAP REGISTRATION, {len(registration)} bytes",
        )
    )

    # 3. A PU resolves the pool handle
    response = samples.handle_resolution_response(3)
    data = messages.encode(response)
    decoded = cast(messages.HandleResolutionResponse, messages.decode(data))
    table = Table(
        title=f"3. ASAP HANDLE_RESOLUTION_RESPONSE ({len(data)} bytes) as the PU decodes it"
    )
    for column in ("PE", "user transport", "policy", "load"):
        table.add_column(column)
    for element in decoded.pool_elements:
        table.add_row(
            f"0x{element.identifier:x}",
            _transport(element.user_transport),
            params.PolicyType(element.policy.policy_type).name,
            f"{params.load_from_wire(element.policy.load):.0%}",
        )
    console.print(table)

    # 4. The session: create request, answer, cookie
    secret = b"demo pool secret"
    create = session.CreateServer("web1", "nbd://san:10809/web1", ("10.0.5.1",), 300)
    result = session.CreateResult(
        "web1", session.ResultCode.STARTED, 410_000, "started"
    )
    state = cookie.SessionState(
        b"Xen",
        "web1",
        create.disk,
        create.ips,
        300,
        1,
        True,
        "pe1",
        0x1000,
        time.time(),
    )
    sealed = cookie.seal(state, secret)
    stream = framing.ShimStream()
    for sent in (create, result, messages.Cookie(sealed)):
        stream.feed(framing.frame_message(sent))
    table = Table(title="4. PE<->PU session over TCP (shim frames {PPID, length})")
    table.add_column("PPID")
    table.add_column("message")
    while (item := stream.next_message()) is not None:
        ppid, msg = item
        shown = (
            f"COOKIE ({len(msg.cookie)} bytes, HMAC-SHA256)"
            if isinstance(msg, messages.Cookie)
            else repr(msg)
        )
        table.add_row(
            "ASAP (11)" if ppid == messages.ASAP_PPID else f"xenpool (0x{ppid:08x})",
            shown,
        )
    console.print(table)

    # 5. Refusals
    table = Table(title="5. What a PE refuses, and why")
    table.add_column("input")
    table.add_column("answer")
    tampered = bytearray(sealed)
    tampered[20] ^= 1
    cases = [
        (
            "cookie with one bit flipped",
            lambda: cookie.unseal(
                bytes(tampered),
                secret,
                pool_handle=b"Xen",
                now=time.time(),
                max_age_s=600,
            ),
        ),
        (
            "cookie a day old",
            lambda: cookie.unseal(
                sealed,
                secret,
                pool_handle=b"Xen",
                now=time.time() + 86400,
                max_age_s=600,
            ),
        ),
        (
            "cookie for pool 'Web'",
            lambda: cookie.unseal(
                sealed, secret, pool_handle=b"Web", now=time.time(), max_age_s=600
            ),
        ),
        (
            "create with RAM 0",
            lambda: session.decode(
                session.encode(session.CreateServer("web1", "", (), 0))
            ),
        ),
        (
            "create with IP 10.0.5.300",
            lambda: session.decode(
                session.encode(session.CreateServer("web1", "", ("10.0.5.300",), 64))
            ),
        ),
        ("ASAP message type 0x42", lambda: messages.decode(b"\x42\x00\x00\x04")),
        ("REGISTRATION cut short", lambda: messages.decode(registration[:-8] + b"")),
    ]
    for label, attempt in cases:
        try:
            attempt()
            answer = "[red]accepted?![/red]"
        except ProtocolError as err:
            if label.startswith(
                "create"
            ):  # the PE answers a bad request in the session
                answer = f"{err}  ->  create_failed, code {session.ResultCode.INVALID_REQUEST.value}"
            elif label.startswith("cookie"):
                answer = f"{err}  ->  create_failed, code {session.ResultCode.COOKIE_REJECTED.value}"
            else:
                answer = f"{err}  ->  ASAP ERROR, cause {err.cause.name}"
        table.add_row(label, answer)
    console.print(table)

    console.print(
        "\nNext: the registrar (`twistd -n xenpool-registrar`), the PE daemon on libvirt and the PU "
        "with failover. Until they exist, their twistd commands stop with a message saying so."
    )
    return 0
