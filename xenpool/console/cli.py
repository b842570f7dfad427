"""``xenpool status``, ``xenpool host drain|resume`` and ``xenpool vm list|stop|start|move``.

Everything comes from the registrar's console document ``/pool`` (the registrar reads
the PEs' and keepers' own status endpoints). Host commands are POSTed to the PE's
``/admin``, signed with the pool secret; moves are the planned-move requests a
rebalancing leader sends (``MoveRequest``, signed with the pool secret) to the VM's PE
over its session port. Every refusal is one line on stderr and a non-zero exit, and a
command refused before it starts changes nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
import urllib.error
import urllib.request

EXIT_REFUSED = 1


class Refused(Exception):
    """One line for the operator; nothing was changed unless it says so."""


# ------------------------------------------------------------ reading the pool


def get_pool(registrar: str, timeout: float = 20.0) -> dict:
    if not registrar:
        raise Refused("--status HOST:PORT (or $XENPOOL_STATUS) is required")
    url = f"http://{registrar}/pool"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return json.load(response)
    except urllib.error.HTTPError as err:
        raise Refused(
            f"{url}: HTTP {err.code} (a registrar with the console?)"
        ) from None
    except (urllib.error.URLError, OSError, ValueError) as err:
        raise Refused(f"{url}: {getattr(err, 'reason', err)}") from None


def _host(view: dict, name: str) -> dict:
    for host in view["hosts"]:
        if host["name"] == name:
            return host
    known = ", ".join(h["name"] for h in view["hosts"]) or "none"
    raise Refused(f"no host named {name!r} in the pool (hosts: {known})")


def _vm(view: dict, name: str) -> dict:
    for vm in view["vms"]:
        if vm["name"] == name:
            return vm
    known = ", ".join(v["name"] for v in view["vms"]) or "none"
    raise Refused(f"no VM named {name!r} in the pool (VMs: {known})")


def read_secret(path: str | None) -> bytes:
    if not path:
        raise Refused(
            "--pool-secret-file FILE (or XENPOOL_POOL_SECRET_FILE) is required: host and VM commands are signed with the pool secret"
        )
    from ..config import secret_file

    try:
        return secret_file(path)
    except ValueError as err:
        raise Refused(f"--pool-secret-file: {err}") from None


# ------------------------------------------------------------ status


def _mb(kb) -> str:
    return "-" if kb is None else f"{kb // 1024} MB"


def _ago(seconds) -> str:
    if seconds is None:
        return ""
    s = round(seconds)
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min"
    return f"{s // 3600} h {s % 3600 // 60} min"


STATE_STYLE = {
    "up": "green",
    "draining": "yellow",
    "maintenance": "yellow",
    "fenced": "red",
    "unreachable": "red",
}


def render(view: dict):
    """The pool as rich renderables: hosts, VMs, recent events."""
    from rich.console import Group
    from rich.table import Table

    now = view["time"]
    hosts = Table(
        title=f"xenpool: {sum(h['state'] == 'up' for h in view['hosts'])}/{len(view['hosts'])} hosts up, "
        f"{sum(v['state'] == 'running' for v in view['vms'])}/{len(view['vms'])} VMs running "
        f"(registrar {view['registrar']})",
        title_justify="left",
    )
    for column in (
        "host",
        "PE",
        "state",
        "load",
        "free RAM",
        "CPUs",
        "VMs",
        "PUs reach it at",
    ):
        hosts.add_column(column)
    for h in view["hosts"]:
        style = STATE_STYLE.get(h["state"], "white")
        hosts.add_row(
            h["name"],
            h.get("pe") or "-",
            f"[{style}]{h['state']}[/{style}]",
            "-" if h.get("load") is None else f"{h['load']:.0%}",
            _mb(h.get("free_ram_kb")),
            str(h.get("cpus") or "-"),
            " ".join(h.get("vms", [])),
            h.get("transport") or "-",
        )
    vms = Table(title="VMs", title_justify="left")
    for column in ("VM", "host", "state", "uptime", "keeper", "last failover"):
        vms.add_column(column)
    for v in view["vms"]:
        lf = v.get("last_failover")
        last = (
            f"{lf['from']} -> {lf['to']}"
            + (f" in {lf['took_s']:.2f} s" if lf.get("took_s") is not None else "")
            + f", {_ago(now - lf['time'])} ago"
            if lf
            else ""
        )
        state = v["state"]
        if v.get("domain_state") and v["domain_state"] != state:
            state += f" ({v['domain_state']})"
        style = "green" if v["state"] == "running" else "yellow"
        vms.add_row(
            v["name"],
            v.get("host") or "-",
            f"[{style}]{state}[/{style}]",
            _ago(v.get("uptime_s")),
            v.get("keeper") or "-",
            last,
        )
    events = Table(
        title="recent fencing, failovers and maintenance", title_justify="left"
    )
    for column in ("when", "event", "what", "by"):
        events.add_column(column)
    shown = [e for e in view["events"] if e["kind"] != "host_back"][-15:]
    for e in shown:
        events.add_row(
            time.strftime("%H:%M:%S", time.localtime(e["time"])),
            e["kind"].replace("_", " "),
            describe_event(e),
            e.get("source", ""),
        )
    return Group(hosts, vms, events)


def describe_event(e: dict) -> str:
    kind = e["kind"]
    if kind.startswith("fence"):
        text = f"{e.get('host')} for {e.get('server_id')}"
        return text + (f": {e['reason']}" if e.get("reason") else "")
    if kind in ("failover", "moved"):
        took = f" in {e['took_s']:.2f} s" if e.get("took_s") is not None else ""
        frm = e.get("from_host") or e.get("from_pe")
        to = e.get("to_host") or e.get("to_pe")
        return f"{e['server_id']}: {frm} -> {to}{took}"
    if kind in ("host_lost", "host_back"):
        return f"{e.get('host') or e.get('pe')}" + (
            f" ({e['reason']})" if e.get("reason") else ""
        )
    if kind == "maintenance":
        return f"{e.get('host')}: {e.get('state')}"
    if kind == "vm_lost":
        return f"{e['server_id']} on {e.get('host') or e.get('pe')}"
    return f"{e.get('server_id', '')} {e.get('reason', '')}".strip()


def cmd_status(args) -> int:
    from rich.console import Console

    if args.json:
        print(json.dumps(get_pool(args.registrar, args.timeout), indent=1))
        return 0
    console = Console()
    if not args.watch:
        console.print(render(get_pool(args.registrar, args.timeout)))
        return 0
    from rich.live import Live

    with Live(console=console, screen=False, auto_refresh=False) as live:
        try:
            while True:
                try:
                    live.update(render(get_pool(args.registrar, args.timeout)))
                except Refused as err:
                    from rich.text import Text

                    live.update(Text(f"xenpool status: {err}", style="red"))
                live.refresh()
                time.sleep(args.watch)  # the screen's refresh interval
        except KeyboardInterrupt:
            return 0


# ------------------------------------------------------------ talking to a PE


def ask_pe(address: str, message, answer_type: type, timeout: float):
    """Send one session message to a PE's session port; its first ``answer_type``."""
    from ..protocol.framing import ShimStream, frame_message

    host, _, port = address.rpartition(":")
    stream = ShimStream()
    deadline = time.monotonic() + timeout
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as sock:
            sock.sendall(frame_message(message))
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Refused(f"PE at {address} gave no answer in {timeout:g} s")
                sock.settimeout(left)
                data = sock.recv(65536)
                if not data:
                    raise Refused(f"PE at {address} closed without an answer")
                stream.feed(data)
                while (item := stream.next_message()) is not None:
                    _ppid, answer = item
                    if isinstance(answer, answer_type):
                        return answer
    except TimeoutError:
        raise Refused(f"PE at {address} gave no answer in {timeout:g} s") from None
    except OSError as err:
        raise Refused(f"PE at {address}: {err.strerror or err}") from None


def move(view: dict, vm: dict, target: dict, secret: bytes, timeout: float) -> str:
    """Ask the VM's PE to move it to ``target`` (live where the target takes live
    migrations); the answer's reason once the PE stopped or migrated it."""
    from ..protocol import session as S

    source = _host(view, vm["host"])
    if not source.get("address") or not target.get("address"):
        raise Refused(f"{vm['host']} or {target['name']} is not registered")
    report = ask_pe(
        target["address"], S.VmQuery(0), S.VmReport, min(timeout, 5.0)
    )  # where it takes live migrations, if it does
    issued = int(time.time())
    target_pe = int(target["pe"], 16)
    mac = S.move_request_mac(secret, 0, vm["name"], target_pe, report.migration, issued)
    request = S.MoveRequest(0, vm["name"], target_pe, mac, report.migration, issued)
    answer = ask_pe(source["address"], request, S.MoveAnswer, timeout)
    if not answer.moved:
        raise Refused(f"{source['name']} refused to move {vm['name']}: {answer.reason}")
    return answer.reason


def wait_until(registrar: str, done, timeout: float, what: str) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        try:
            view = get_pool(registrar)
            if done(view):
                return view
        except Refused:
            pass
        if time.monotonic() > deadline:
            raise Refused(f"{what}: not done within {timeout:g} s")
        time.sleep(0.5)  # polling the registrar's console document


def _runs_on(name: str, host: str):
    def done(view: dict) -> bool:
        return any(
            v["name"] == name and v["host"] == host and v["state"] == "running"
            for v in view["vms"]
        )

    return done


# ------------------------------------------------------------ host commands


def plan_drain(view: dict, host: dict) -> list[tuple[str, str]]:
    """(VM, target host) for every VM on ``host``: the largest first, each to the up
    host with the most free RAM left. Refused when one fits nowhere."""
    targets = {
        h["name"]: h["free_ram_kb"]
        for h in view["hosts"]
        if h["name"] != host["name"]
        and h["state"] == "up"
        and h.get("registered")
        and h.get("free_ram_kb") is not None
    }
    ram = {v["name"]: v.get("ram_mb") for v in view["vms"]}
    ram.update(host.get("vm_ram_mb") or {})
    if host.get("orphans"):
        raise Refused(
            f"{', '.join(host['orphans'])} on {host['name']} has no keeper connected; it cannot be moved"
        )
    plan = []
    for name in sorted(host.get("vms", []), key=lambda n: -(ram.get(n) or 0)):
        need = (ram.get(name) or 0) * 1024
        fits = [t for t, free in targets.items() if free >= need]
        if not fits:
            free = (
                ", ".join(f"{t} {f // 1024} MB" for t, f in targets.items())
                or "no other host is up"
            )
            raise Refused(
                f"{name} ({need // 1024} MB) fits on no other host (free: {free})"
            )
        best = max(fits, key=lambda t: targets[t])
        targets[best] -= need
        plan.append((name, best))
    return plan


def post_command(host: dict, secret: bytes, action: str, timeout: float) -> dict:
    if not host.get("status_url"):
        raise Refused(
            f"the registrar has no status URL for {host['name']} (--console-pe)"
        )
    return post_signed(
        host["status_url"], secret, action, host["name"], host["name"], timeout
    )


def post_signed(
    url: str, secret: bytes, action: str, target: str, who: str, timeout: float
) -> dict:
    """POST a signed command to a daemon's ``/admin``; its answer, or Refused."""
    from .admin import sign

    body = json.dumps(sign(secret, action, target, int(time.time()))).encode()
    request = urllib.request.Request(
        f"{url}/admin",
        data=body,
        headers={"content-type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.load(response)
    except urllib.error.HTTPError as err:
        try:
            message = json.load(err).get("message", f"HTTP {err.code}")
        except ValueError:
            message = f"HTTP {err.code}"
        raise Refused(f"{who} refused: {message}") from None
    except (urllib.error.URLError, OSError) as err:
        raise Refused(f"{who}: {getattr(err, 'reason', err)}") from None


def cmd_host(args) -> int:
    view = get_pool(args.registrar)
    host = _host(view, args.host)
    if host["state"] in ("unreachable", "fenced"):
        raise Refused(f"{host['name']} is {host['state']}")
    secret = read_secret(args.pool_secret_file)
    if args.action == "resume":
        answer = post_command(host, secret, "resume", args.timeout)
        print(f"{host['name']} resumed: {answer['message']}")
        return 0
    plan = plan_drain(view, host)
    answer = post_command(host, secret, "drain", args.timeout)
    print(f"{host['name']}: draining, new VMs go elsewhere ({len(plan)} to move)")
    for name, target in plan:
        vm = next((v for v in view["vms"] if v["name"] == name), None) or {
            "name": name,
            "host": host["name"],
        }
        try:
            how = move(view, vm, _host(view, target), secret, args.timeout)
            wait_until(
                args.registrar,
                _runs_on(name, target),
                args.timeout,
                f"{name} to {target}",
            )
        except Refused as err:
            raise Refused(
                f"{err}; {host['name']} stays draining (xenpool host resume {host['name']} undoes it)"
            ) from None
        print(f"  {name} -> {target}: {how}", flush=True)
    wait_until(
        args.registrar,
        lambda v: _host(v, host["name"])["state"] == "maintenance",
        args.timeout,
        f"{host['name']} empty",
    )
    del answer
    print(
        f"{host['name']} is in maintenance: no VM left, it can be powered off without a failover"
    )
    return 0


# ------------------------------------------------------------ VM commands


def cmd_vm(args) -> int:
    view = get_pool(args.registrar)
    if args.action == "list":
        for v in view["vms"]:
            print(f"{v['name']}\t{v.get('host') or '-'}\t{v['state']}")
        return 0
    vm = _vm(view, args.name)
    if args.action == "move":
        target = _host(view, args.to)
        if vm.get("host") is None or vm["state"] != "running":
            raise Refused(f"{vm['name']} is not running ({vm['state']})")
        if vm["host"] == target["name"]:
            raise Refused(f"{vm['name']} runs on {target['name']} already")
        if target["state"] != "up":
            raise Refused(f"{target['name']} is {target['state']}: it takes no VM")
        need = (vm.get("ram_mb") or 0) * 1024
        if target.get("free_ram_kb") is not None and target["free_ram_kb"] < need:
            raise Refused(
                f"{vm['name']} needs {need // 1024} MB, {target['name']} has {target['free_ram_kb'] // 1024} MB free"
            )
        secret = read_secret(args.pool_secret_file)
        how = move(view, vm, target, secret, args.timeout)
        wait_until(
            args.registrar,
            _runs_on(vm["name"], target["name"]),
            args.timeout,
            f"{vm['name']} to {target['name']}",
        )
        print(f"{vm['name']} moved to {target['name']}: {how}")
        return 0
    # stop, start: through the VM's keeper
    if not vm.get("keeper"):
        raise Refused(
            f"{vm['name']} has no keeper the registrar knows (--console-keeper)"
        )
    stopped = vm["state"] in ("stopped", "refused")
    if args.action == "stop" and stopped:
        raise Refused(f"{vm['name']} is {vm['state']} already")
    if args.action == "start" and not stopped:
        raise Refused(f"{vm['name']} is {vm['state']}, not stopped")
    secret = read_secret(args.pool_secret_file)
    post_signed(
        vm["keeper"],
        secret,
        args.action,
        vm["name"],
        f"keeper {vm['keeper']}",
        args.timeout,
    )
    want = "stopped" if args.action == "stop" else "running"
    done = wait_until(
        args.registrar,
        lambda v: _vm(v, vm["name"])["state"] == want,
        args.timeout,
        f"{vm['name']} {want}",
    )
    where = _vm(done, vm["name"]).get("host")
    print(
        f"{vm['name']} {want}" + (f" on {where}" if want == "running" and where else "")
    )
    return 0


def run(func, args) -> int:
    if args.status_old and not args.registrar:
        print(
            f"xenpool {args.command}: --registrar is deprecated here, use --status HOST:PORT",
            file=sys.stderr,
        )
        args.registrar = args.status_old
    if not args.registrar:
        print(
            f"xenpool {args.command}: --status HOST:PORT (or $XENPOOL_STATUS) is required",
            file=sys.stderr,
        )
        return 2
    try:
        return func(args)
    except Refused as err:
        print(f"xenpool {args.command}: {err}", file=sys.stderr)
        return EXIT_REFUSED


def add_parsers(sub) -> None:
    def common(p, secret: bool) -> None:
        p.add_argument(
            "--status",
            dest="registrar",
            default=os.environ.get("XENPOOL_STATUS"),
            metavar="HOST:PORT",
            help="the registrar's HTTP status port, its --status (default: $XENPOOL_STATUS)",
        )
        # the old name, before --registrar meant an ASAP endpoint everywhere else
        p.add_argument("--registrar", dest="status_old", help=argparse.SUPPRESS)
        p.add_argument("--timeout", type=float, default=120.0, metavar="S")
        if secret:
            p.add_argument(
                "--pool-secret-file",
                default=os.environ.get("XENPOOL_POOL_SECRET_FILE"),
                metavar="FILE",
                help="the pool secret (default: $XENPOOL_POOL_SECRET_FILE)",
            )

    st = sub.add_parser("status", help="the pool: hosts, VMs, fencing and failovers")
    common(st, False)
    st.set_defaults(timeout=20.0)
    st.add_argument(
        "--json", action="store_true", help="the registrar's /pool document"
    )
    st.add_argument(
        "--watch",
        type=float,
        nargs="?",
        const=2.0,
        default=None,
        metavar="S",
        help="refresh in place every S seconds (default 2)",
    )
    st.set_defaults(func=lambda a: run(cmd_status, a))

    host = sub.add_parser("host", help="host maintenance: drain, resume")
    hsub = host.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, text in (
        ("drain", "move every VM off HOST and keep new ones away"),
        ("resume", "let HOST take VMs again"),
    ):
        p = hsub.add_parser(action, help=text)
        p.add_argument("host", metavar="HOST")
        common(p, True)
        p.set_defaults(func=lambda a: run(cmd_host, a))

    vm = sub.add_parser("vm", help="VMs: list, stop, start, move")
    vsub = vm.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = vsub.add_parser("list", help="every VM with its host and state")
    common(p, False)
    p.set_defaults(func=lambda a: run(cmd_vm, a))
    for action, text in (
        ("stop", "stop a VM through its keeper (kept stopped until vm start)"),
        ("start", "start a stopped VM through its keeper"),
    ):
        p = vsub.add_parser(action, help=text)
        p.add_argument("name", metavar="NAME")
        common(p, True)
        p.set_defaults(func=lambda a: run(cmd_vm, a))
    p = vsub.add_parser("move", help="move a VM to a named host (live where possible)")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--to", required=True, metavar="HOST")
    common(p, True)
    p.set_defaults(func=lambda a: run(cmd_vm, a))
