"""The operator's console end to end: a registrar, three PE daemons on libvirt's test
driver and a keeper as real processes (``xenpool.tools.cluster_demo.Cluster``), driven
with the real ``xenpool`` command, alerts posted by the webhook example to an HTTP
server of the test, and the web page read by headless Chromium where it is installed.

The tests run in file order on one pool: refusals, a move, a drain, a stopped drained
host, then a killed host and its failover."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from xenpool.tools.cluster_demo import Cluster

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parents[1]
XENPOOL = str(Path(sys.executable).with_name("xenpool"))
CHROMIUM = shutil.which("chromium")


class Webhook(ThreadingHTTPServer):
    """Where the webhook alert example posts: keeps every event, and lets a test wait
    for one (a condition variable, no sleep)."""

    def __init__(self) -> None:
        self.events: list[dict] = []
        self.changed = threading.Condition()
        super().__init__(("127.0.0.1", 0), _Handler)

    def wait_for(self, done, timeout: float = 30.0) -> list[dict]:
        with self.changed:
            if not self.changed.wait_for(lambda: done(self.events), timeout):
                raise AssertionError(f"alerts not seen; got {self.events}")
            return list(self.events)


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        event = json.loads(self.rfile.read(int(self.headers["content-length"])))
        with self.server.changed:
            self.server.events.append(event)
            self.server.changed.notify_all()
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def webhook():
    server = Webhook()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def pool(tmp_path_factory, webhook):
    workdir = tmp_path_factory.mktemp("console")
    url = f"http://127.0.0.1:{webhook.server_address[1]}/"
    cluster = Cluster(
        workdir,
        alerts=(
            f"{ROOT / 'examples/alerts/webhook.py'} {url}",
            "sh -c 'sleep 600'",  # a slow alert: killed after --alert-timeout, delays nothing
        ),
    )
    try:
        cluster.start()
        cluster.keeper.wait_for("db1: running", timeout=60)
        for name in ("web1", "web2", "mail1", "app1", "app2"):
            cluster.keeper.wait_for(f"{name}: running", timeout=60)
        yield cluster
    finally:
        cluster.stop()


def xenpool(
    pool: Cluster, *args: str, secret: bool = True
) -> subprocess.CompletedProcess:
    env = {**os.environ, "XENPOOL_STATUS": f"127.0.0.1:{pool.registrar_status}"}
    env.pop("XENPOOL_POOL_SECRET_FILE", None)
    if secret:
        env["XENPOOL_POOL_SECRET_FILE"] = str(pool.dir / "secret")
    return subprocess.run(
        [XENPOOL, *args], capture_output=True, text=True, env=env, timeout=180
    )


def view(pool: Cluster) -> dict:
    done = xenpool(pool, "status", "--json")
    assert done.returncode == 0, (
        done.stderr + "\nregistrar log:\n" + pool.registrar.drain()[-3000:]
    )
    return json.loads(done.stdout)


def domains(pool: Cluster) -> dict[str, list[str]]:
    """Every VM with the hosts whose hypervisor runs it (libvirt's own list)."""
    found: dict[str, list[str]] = {}
    for n, pe in pool.pes.items():
        if not pe.alive():
            continue
        with urllib.request.urlopen(
            f"http://127.0.0.1:{pe.status_port}/status", timeout=10
        ) as response:
            status = json.load(response)
        for name, domain in status["domains"].items():
            if domain["state"] == 1:
                found.setdefault(name, []).append(f"host{n}")
    return found


def where(pool: Cluster) -> dict[str, str]:
    return {vm["name"]: vm["host"] for vm in view(pool)["vms"]}


def test_status_shows_hosts_by_name_and_every_vm(pool):
    done = xenpool(pool, "status")
    assert done.returncode == 0, done.stderr
    for text in ("host1", "host2", "host3", "0x00000002", "web1", "db1", "running"):
        assert text in done.stdout
    v = view(pool)
    assert {h["name"]: h["state"] for h in v["hosts"]} == {
        "host1": "up",
        "host2": "up",
        "host3": "up",
    }
    assert all(h["cpus"] == 2 and h["free_ram_kb"] > 0 for h in v["hosts"])
    assert sorted(vm["name"] for vm in v["vms"]) == sorted(pool.vm_ram)
    assert all(vm["state"] == "running" and vm["host"] for vm in v["vms"])
    listed = xenpool(pool, "vm", "list")
    assert listed.returncode == 0 and len(listed.stdout.splitlines()) == 6


@pytest.mark.parametrize(
    "args, secret, message",
    [
        (("vm", "move", "nope", "--to", "host1"), True, "no VM named 'nope'"),
        (("vm", "move", "web1", "--to", "host9"), True, "no host named 'host9'"),
        (("host", "drain", "host9"), True, "no host named 'host9'"),
        (("host", "drain", "host2"), False, "--pool-secret-file FILE"),
        (("vm", "move", "web1", "--to", "host1"), False, None),
    ],
)
def test_bad_commands_are_refused_with_one_line_and_change_nothing(
    pool, args, secret, message
):
    before = where(pool)
    if message is None:  # moving web1 without a secret, to a host it is not on
        target = next(h for h in ("host1", "host2") if before["web1"] != h)
        args, message = ("vm", "move", "web1", "--to", target), "--pool-secret-file"
    done = xenpool(pool, *args, secret=secret)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and message in done.stderr, done.stderr
    assert where(pool) == before
    assert {h["state"] for h in view(pool)["hosts"]} == {"up"}


def test_a_wrong_secret_is_refused_by_the_pe(pool, tmp_path):
    wrong = tmp_path / "wrong"
    wrong.write_text("not the pool secret at all\n")
    done = xenpool(pool, "host", "drain", "host2", "--pool-secret-file", str(wrong))
    assert done.returncode == 1
    assert "host2 refused: not signed with this pool's secret" in done.stderr
    assert {h["state"] for h in view(pool)["hosts"]} == {"up"}


def test_vm_move_to_a_named_host(pool):
    before = where(pool)
    target = next(h for h in ("host1", "host3") if before["web1"] != h)
    done = xenpool(pool, "vm", "move", "web1", "--to", target)
    assert done.returncode == 0, done.stderr
    assert f"web1 moved to {target}" in done.stdout
    assert where(pool)["web1"] == target
    assert domains(pool)["web1"] == [target]
    again = xenpool(pool, "vm", "move", "web1", "--to", target)
    assert again.returncode == 1 and f"runs on {target} already" in again.stderr


def test_drain_host2_moves_every_vm_once_and_fences_no_one(pool, webhook):
    mark = {n: pe.mark() for n, pe in pool.pes.items()}
    done = xenpool(pool, "host", "drain", "host2")
    assert done.returncode == 0, done.stderr
    assert "host2 is in maintenance" in done.stdout
    v = view(pool)
    assert {h["name"]: h["state"] for h in v["hosts"]}["host2"] == "maintenance"
    assert all(vm["state"] == "running" and vm["host"] != "host2" for vm in v["vms"])
    running = domains(pool)
    assert sorted(running) == sorted(pool.vm_ram)
    assert all(len(hosts) == 1 and hosts != ["host2"] for hosts in running.values())
    # A drained host is stopped: no failover, no fence.
    pool.pes[2].stop()
    pool.registrar.wait_for("0x00000002", since=0)
    after = view(pool)
    assert all(vm["state"] == "running" for vm in after["vms"])
    kinds = {e["kind"] for e in after["events"]}
    assert not kinds & {"fence_attempt", "fence_success", "failover", "vm_lost"}
    for n, pe in pool.pes.items():
        assert "fenced" not in pe.log[mark[n] :]
    events = webhook.wait_for(
        lambda es: (
            any(e["kind"] == "maintenance" for e in es)
            and sum(e["kind"] == "moved" for e in es) >= 2
        )
    )
    assert not {e["kind"] for e in events} & {"fence_attempt", "failover"}
    # Back from its maintenance (a PE started again is up): room for the next test.
    pool.start_pe(2)
    assert xenpool(pool, "host", "resume", "host2").returncode == 0
    assert {h["name"]: h["state"] for h in view(pool)["hosts"]}["host2"] == "up"


def test_vm_stop_and_start_through_the_keeper(pool):
    stopped = xenpool(pool, "vm", "stop", "app2")
    assert stopped.returncode == 0, stopped.stderr
    assert "app2 stopped" in stopped.stdout
    assert "app2" not in domains(pool)
    assert {vm["name"]: vm["state"] for vm in view(pool)["vms"]}["app2"] == "stopped"
    again = xenpool(pool, "vm", "stop", "app2")
    assert again.returncode == 1 and "app2 is stopped already" in again.stderr
    no_secret = xenpool(pool, "vm", "start", "app2", secret=False)
    assert no_secret.returncode == 1 and "app2" not in domains(pool)
    started = xenpool(pool, "vm", "start", "app2")
    assert started.returncode == 0, started.stderr
    assert "app2 running on host" in started.stdout
    assert len(domains(pool)["app2"]) == 1


def test_the_keeper_reloads_its_vm_list_on_sighup(pool):
    keep = pool.dir / "vms.conf"
    text = keep.read_text()
    mail1 = text[text.index("[vm mail1]") : text.index("[vm app1]")]
    changed = text.replace(mail1, "").replace(
        "ram = 256\nips = 10.0.5.1", "ram = 200\nips = 10.0.5.1"
    )
    keep.write_text(changed + "[vm new1]\nram = 64\nips = 10.0.5.9\n")
    mark = pool.keeper.mark()
    pool.keeper.proc.send_signal(signal.SIGHUP)
    log = pool.keeper.wait_for("new1: running", since=mark, timeout=60)[mark:]
    assert "SIGHUP: mail1: removed from the keep file: stopped" in log
    assert "SIGHUP: web1: changed in the keep file, not applied" in log
    pool.keeper.wait_for("mail1: stopped", since=mark, timeout=60)
    del pool.vm_ram["mail1"]
    pool.vm_ram["new1"] = 64
    running = domains(pool)
    assert sorted(running) == sorted(pool.vm_ram)
    assert all(len(hosts) == 1 for hosts in running.values())
    vms = {vm["name"]: vm for vm in view(pool)["vms"]}
    assert "mail1" not in vms and vms["new1"]["state"] == "running"
    assert vms["web1"]["ram_mb"] == 256  # the running VM as it was


needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="headless Chromium (Debian package chromium) not installed"
)


@needs_chromium
def test_the_web_page_shows_hosts_and_their_vms(pool, tmp_path):
    dom = dump_dom(f"http://127.0.0.1:{pool.registrar_status}/", tmp_path)
    for name, host in where(pool).items():
        card = dom.split(f'data-host="{host}"', 1)[1].split('class="host', 1)[0]
        assert f'<span class="vm">{name}</span>' in card
    assert dom.count('<tr data-vm="') == len(pool.vm_ram)


def test_a_killed_host_fails_over_and_status_and_alerts_show_it(pool, webhook):
    placed = where(pool)
    victim = max(("host1", "host3"), key=lambda h: list(placed.values()).count(h))
    survivors = {"host1", "host2", "host3"} - {victim}
    moved = sorted(name for name, host in placed.items() if host == victim)
    mark = pool.keeper.mark()
    pool.pes[int(victim[-1])].kill()
    for name in moved:
        pool.keeper.wait_for(f"{name}: running", since=mark, timeout=60)
    v = view(pool)
    hosts = {h["name"]: h["state"] for h in v["hosts"]}
    assert hosts[victim] == "fenced" and {hosts[h] for h in survivors} == {"up"}
    vms = {vm["name"]: vm for vm in v["vms"]}
    for name in moved:
        assert vms[name]["host"] in survivors
        assert vms[name]["last_failover"]["from"] == victim
        assert vms[name]["last_failover"]["to"] == vms[name]["host"]
    running = domains(pool)
    assert sorted(running) == sorted(pool.vm_ram)
    assert all(len(hosts) == 1 for hosts in running.values())
    text = xenpool(pool, "status").stdout
    assert "fenced" in text and "failover" in text and f"{victim} -> " in text
    # The alerts: each VM's fence before its failover (by the events' own time: they
    # come from two daemons, the PE that fenced and the keeper), each daemon's in order.
    events = webhook.wait_for(
        lambda es: (
            all(
                any(e["kind"] == "failover" and e["server_id"] == n for e in es)
                for n in moved
            )
            and sum(e["kind"] == "fence_success" for e in es) >= len(moved)
        )
    )
    for name in moved:
        mine = [e for e in events if e.get("server_id") == name]
        kinds = [e["kind"] for e in sorted(mine, key=lambda e: e["time"])]
        fence = kinds.index("fence_success")
        assert kinds.index("fence_attempt") < fence < kinds.index("failover")
    by_source: dict[str, list[int]] = {}
    for e in events:
        by_source.setdefault(e["source"], []).append(e["sequence"])
    assert all(seq == sorted(seq) for seq in by_source.values())
    assert any(e["kind"] == "host_lost" and e["host"] == victim for e in events)
    pool.victim = victim


@needs_chromium
def test_the_web_page_shows_the_failover(pool, tmp_path):
    """After the killed host: its card says fenced, the events list the failovers. The
    screenshot goes to $XENPOOL_SCREENSHOT (docs/console.png for the README)."""
    page = f"http://127.0.0.1:{pool.registrar_status}/"
    dom = dump_dom(page, tmp_path)
    victim = getattr(pool, "victim", None)
    assert victim is not None, "runs after the killed-host test"
    assert f'class="host fenced" data-host="{victim}"' in dom
    assert '<tr class="ev-failover">' in dom and f"{victim} → " in dom
    shot = Path(os.environ.get("XENPOOL_SCREENSHOT", tmp_path / "console.png"))
    screenshot(page, shot, tmp_path)


def chromium(*args: str, tmp_path: Path) -> str:
    done = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            f"--user-data-dir={tmp_path / 'chromium'}",
            "--virtual-time-budget=4000",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def dump_dom(url: str, tmp_path: Path) -> str:
    return chromium("--dump-dom", url, tmp_path=tmp_path)


def screenshot(url: str, path: Path, tmp_path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    chromium(
        f"--screenshot={path.resolve()}",
        "--window-size=1280,1100",
        "--hide-scrollbars",
        url,
        tmp_path=tmp_path,
    )
    assert path.stat().st_size > 10_000
