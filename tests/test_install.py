"""In a fresh venv, `pip install .` (or `pip install -e .`) then `twistd --help` lists the xenpool daemons.

The fresh venv gets no pip and no dependencies of its own: a .pth file puts this venv's
site-packages on its path as a plain directory, so Twisted, pluggy, pip, setuptools...
resolve from here, while this venv's .pth files (the editable-install finder, the
drop-in directory for twistd) are not processed. xenpool itself is a real, non-editable
install in the fresh venv's site-packages (and, for the editable checks, an editable
install of a copy of the tree).
"""

from __future__ import annotations

import importlib.util
import json
import shlex
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path
from typing import NamedTuple

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
DAEMONS = ("xenpool-registrar", "xenpool-pe", "xenpool-pu")
# Not part of the source tree: the venv, VCS data and build/test leftovers.
NOT_SOURCE = shutil.ignore_patterns(
    ".venv",
    ".git",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    ".pytest_cache",
    ".hypothesis",
    ".benchmarks",
    "dropin.cache",
    "*.pcap",
    ".coverage*",
    "htmlcov",
    "_trial_temp",
)


def run(
    *args: str | Path, cwd: Path, timeout: float = 300
) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, (
        f"{args} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    )
    return result


def _ensure_build_tools(python: Path, cwd: Path) -> None:
    """--no-build-isolation builds with this venv's setuptools (and, before setuptools
    70.1, wheel's bdist_wheel); the fresh venv sees them through the .pth file. Missing
    ones go into the fresh venv ``python``, never into this one."""
    missing = [
        name
        for name in ("setuptools", "wheel")
        if importlib.util.find_spec(name) is None
    ]
    if missing:
        run(python, "-m", "pip", "install", "--quiet", *missing, cwd=cwd)


class Fresh(NamedTuple):
    venv: Path  # the fresh venv
    site: Path  # its site-packages
    cwd: Path  # an empty directory to run commands in
    source: Path  # the copy of the working tree that was installed


def _fresh_install(base: Path, *, editable: bool) -> Fresh:
    cwd = (
        base / "elsewhere"
    )  # neither the checkout nor the venv: nothing on sys.path by accident
    cwd.mkdir()

    venv = base / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=cwd)
    python = venv / "bin" / "python"
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = Path(run(python, "-c", purelib, cwd=cwd).stdout.strip())
    ours = dict.fromkeys(
        [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    )
    (site / "test-venv-site-packages.pth").write_text("".join(f"{p}\n" for p in ours))
    _ensure_build_tools(python, cwd)

    # Install from a copy of the working tree: an in-tree build would write build/ and
    # xenpool.egg-info into the checkout (and reuse a stale build/lib).
    source = base / "source"
    shutil.copytree(ROOT, source, ignore=NOT_SOURCE)
    if editable:
        # What scripts/bootstrap.sh does for a checkout: an editable install, then the
        # drop-in link that lets twistd find twisted/plugins/xenpool_plugins.py.
        run(
            python,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-build-isolation",
            "-e",
            source,
            cwd=cwd,
        )
        run(source / "scripts" / "link-twisted-dropin.sh", venv, cwd=cwd)
    else:
        run(
            python,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-build-isolation",
            source,
            cwd=cwd,
        )
    return Fresh(venv, site, cwd, source)


@pytest.fixture(scope="module")
def fresh(tmp_path_factory) -> Fresh:
    """A fresh venv with xenpool pip-installed from the working tree (not editable)."""
    return _fresh_install(tmp_path_factory.mktemp("install"), editable=False)


@pytest.fixture(scope="module")
def fresh_editable(tmp_path_factory) -> Fresh:
    """A fresh venv with a copy of the working tree installed in editable mode, as bootstrap does."""
    return _fresh_install(tmp_path_factory.mktemp("install-editable"), editable=True)


@pytest.fixture(params=["non-editable", "editable"])
def either_install(request) -> Fresh:
    return request.getfixturevalue(
        "fresh" if request.param == "non-editable" else "fresh_editable"
    )


def test_only_xenpool_plugins_is_importable_and_twistd_finds_the_daemons(
    either_install,
):
    # The built-in plugins have one import name, xenpool_plugins: neither the checkout's
    # plugins/ nor its tests/ is a top-level package, yet twistd finds the drop-in.
    venv, site, cwd, source = either_install
    python = venv / "bin" / "python"
    for name in ("plugins", "tests"):
        result = subprocess.run(
            [python, "-c", f"import {name}"], cwd=cwd, capture_output=True, text=True
        )
        assert result.returncode != 0 and "ModuleNotFoundError" in result.stderr, (
            name,
            result,
        )
    found = run(
        python, "-c", "import xenpool_plugins; print(xenpool_plugins.__file__)", cwd=cwd
    ).stdout
    assert not Path(found.strip()).is_relative_to(ROOT)
    twistd_help = "import sys; from twisted.scripts.twistd import run; sys.argv = ['twistd', '--help']; run()"
    out = run(python, "-c", twistd_help, cwd=cwd).stdout
    for daemon in DAEMONS:
        assert daemon in out, out
    # the sctp: endpoint strings (twisted/plugins/xenpool_sctp.py) are found as well
    parse = "from twisted.internet import endpoints, reactor; print(endpoints.clientFromString(reactor, 'sctp:pr1:3863'))"
    assert run(python, "-c", parse, cwd=cwd).stdout.strip() == "sctp:host=pr1:port=3863"


def test_twistd_help_lists_the_xenpool_daemons(fresh):
    venv, site, cwd, source = fresh
    twistd_help = "import sys; from twisted.scripts.twistd import run; sys.argv = ['twistd', '--help']; run()"
    out = run(venv / "bin" / "python", "-c", twistd_help, cwd=cwd).stdout
    for daemon in DAEMONS:
        assert daemon in out, out


def test_the_drop_in_comes_from_the_installed_copy(fresh):
    venv, site, cwd, source = fresh
    check = textwrap.dedent(
        """
        import json
        from twisted.application.service import IServiceMaker
        from twisted.plugin import getPlugins
        import twisted.plugins
        import twisted.plugins.xenpool_plugins as dropin
        print(json.dumps({
            "dropin": dropin.__file__,
            "path": list(twisted.plugins.__path__),
            "tapnames": sorted(p.tapname for p in getPlugins(IServiceMaker)),
        }))
        """
    )
    found = json.loads(run(venv / "bin" / "python", "-c", check, cwd=cwd).stdout)
    assert Path(found["dropin"]) == site / "twisted" / "plugins" / "xenpool_plugins.py"
    # Twisted's own plugins (from this venv) and ours (from the fresh venv); not the checkout's.
    assert str(site / "twisted" / "plugins") in found["path"]
    assert str(ROOT / "twisted" / "plugins") not in found["path"]
    assert set(DAEMONS) <= set(found["tapnames"])


def test_xenpool_version_from_the_fresh_venv(fresh):
    venv, site, cwd, source = fresh
    from xenpool import __version__

    out = run(venv / "bin" / "xenpool", "--version", cwd=cwd).stdout
    assert out.strip() == f"xenpool {__version__}"
    assert (
        (venv / "bin" / "xenpool")
        .read_text()
        .startswith(f"#!{venv / 'bin' / 'python'}")
    )


def test_the_installed_xenpool_is_the_fresh_venvs_copy(fresh):
    venv, site, cwd, source = fresh
    check = textwrap.dedent(
        """
        import importlib.metadata, json
        import xenpool, xenpool_plugins
        from xenpool.plugins import load_plugins
        provider = load_plugins().get("load", "weighted")
        print(json.dumps({
            "xenpool": xenpool.__file__,
            "xenpool_plugins": xenpool_plugins.__file__,
            "builtin": __import__(provider.factory.__module__, fromlist=["_"]).__file__,
            "dist": str(importlib.metadata.distribution("xenpool")._path),
        }))
        """
    )
    out = run(venv / "bin" / "python", "-c", check, cwd=cwd).stdout
    found = {key: Path(value) for key, value in json.loads(out).items()}
    assert found["xenpool"] == site / "xenpool" / "__init__.py"
    assert found["xenpool_plugins"] == site / "xenpool_plugins" / "__init__.py"
    assert found["builtin"] == site / "xenpool_plugins" / "load.py"
    assert found["dist"].parent == site
    for path in found.values():
        assert not path.is_relative_to(ROOT)


def test_the_wheel_installs_no_twisted_package_init(fresh):
    venv, site, cwd, source = fresh
    # An __init__.py in twisted/plugins (or twisted/) would hide Twisted's own plugins.
    assert (site / "twisted" / "plugins" / "xenpool_plugins.py").is_file()
    assert not (site / "twisted" / "plugins" / "__init__.py").exists()
    assert not (site / "twisted" / "__init__.py").exists()
    [record] = site.glob("xenpool-*.dist-info/RECORD")
    files = {line.split(",")[0] for line in record.read_text().splitlines()}
    assert "twisted/plugins/xenpool_plugins.py" in files
    assert not {"twisted/__init__.py", "twisted/plugins/__init__.py"} & files
    assert not any(name.endswith("dropin.cache") for name in files)


def test_every_source_module_is_installed(fresh):
    venv, site, cwd, source = fresh
    # setup.cfg lists packages by hand; a sub-package missing there is missing here.
    expected = [
        Path(package) / module.relative_to(source / directory)
        for directory, package in [
            ("xenpool", "xenpool"),
            ("plugins", "xenpool_plugins"),
            ("twisted", "twisted"),
        ]
        for module in (source / directory).rglob("*.py")
    ]
    assert len(expected) > 10
    missing = sorted(str(path) for path in expected if not (site / path).is_file())
    assert not missing, f"in the source tree but not installed: {missing}"


@pytest.mark.parametrize("daemon", DAEMONS)
def test_each_daemons_options_load_from_the_installed_copy(fresh, daemon):
    venv, site, cwd, source = fresh
    # `twistd DAEMON --help` imports the daemon's tap module for its options.
    daemon_help = f"import sys; from twisted.scripts.twistd import run; sys.argv = ['twistd', {daemon!r}, '--help']; run()"
    out = run(venv / "bin" / "python", "-c", daemon_help, cwd=cwd).stdout
    assert f"Usage: twistd [options] {daemon} [options]" in out, out


def _twistd(venv: Path) -> list[str]:
    """twistd run by the fresh venv's python (its bin/ has no twistd: Twisted comes
    from this venv through the .pth file)."""
    return [
        str(venv / "bin" / "python"),
        "-c",
        "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()",
    ]


def test_the_domain_templates_and_sample_configs_are_installed(fresh):
    venv, site, cwd, source = fresh
    shipped = site / "xenpool" / "etc"
    for name in ("domain-test.xml", "domain-kvm.xml", "domain-xen.xml", "pe.conf"):
        assert (shipped / name).is_file(), name
    where = (
        "import xenpool_plugins.hypervisor_libvirt as h; print(h.template_dirs()[-1])"
    )
    out = run(venv / "bin" / "python", "-c", where, cwd=cwd).stdout.strip()
    assert Path(out) == shipped


def test_a_pe_from_a_non_editable_install_starts_a_vm(fresh, tmp_path):
    from xenpool.protocol import session as S
    from xenpool.tools.processes import Daemon

    from .daemons import SessionClient, free_port

    venv, site, cwd, source = fresh
    asap, port = free_port(), free_port()
    registrar = Daemon(
        "xenpool-registrar",
        f"--asap=tcp:{asap}:interface=127.0.0.1",
        f"--state-dir={tmp_path}",
        ready="started",
        cwd=cwd,
        twistd=_twistd(venv),
    )
    try:
        pe = Daemon(
            "xenpool-pe",
            f"--registrar=127.0.0.1:{asap}",
            f"--port={port}",
            "--bind=127.0.0.1",
            "--libvirt-uri=test:///default",
            ready="registered in pool Xen",
            cwd=cwd,
            twistd=_twistd(venv),
        )
        try:
            pu = SessionClient(port)
            pu.send(S.CreateServer("installed1", "", (), 64))
            result = pu.receive_until(S.CreateResult)[-1]
            assert result.code == S.ResultCode.STARTED, result
            pu.close()
        finally:
            pe.stop()
    finally:
        registrar.stop()


def test_a_pe_without_its_domain_template_refuses_to_start(fresh, tmp_path):
    venv, site, cwd, source = fresh
    result = subprocess.run(
        [
            *_twistd(venv),
            "-n",
            "--pidfile=",
            "xenpool-pe",
            "--libvirt-uri=test:///default",
            f"--domain-template={tmp_path / 'missing.xml'}",
        ],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stdout + result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("xenpool-pe: --domain-template:") and "missing.xml" in line


def _readme_commands() -> list[str]:
    """The commands of the README's "Running a pool" block (its second sh block: the
    first installs), continuation lines joined, comments dropped."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Running a pool") :]
    block = section.split("```sh\n")[2].split("```")[0]
    commands, current = [], ""
    for line in block.splitlines():
        line = line.split("  #")[0].rstrip() if not line.startswith("#") else ""
        if line.endswith("\\"):
            current += line[:-1]
            continue
        current += line
        if current.strip():
            commands.append(" ".join(current.split()))
        current = ""
    return commands


def test_the_readmes_running_a_pool_commands_work_from_a_non_editable_install(
    fresh, tmp_path
):
    import os
    import signal

    from xenpool.tools.processes import Process

    from .daemons import free_port

    venv, site, cwd, source = fresh
    commands = _readme_commands()
    assert len(commands) == 7 and all(
        c.split()[0] in ("head", "twistd", "printf", "xenpool", "xenpool-pu")
        for c in commands
    ), commands
    # the fresh venv's bin has no twistd (Twisted comes through the .pth file): a shim
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "twistd"
    shim.write_text(f'#!/bin/sh\nexec {shlex.join(_twistd(venv))} "$@"\n')
    shim.chmod(0o755)
    env_path = f"{bin_dir}:{venv / 'bin'}:{os.environ['PATH']}"
    ports = {p: str(free_port()) for p in ("3863", "8080", "8081", "8082", "5001")}
    work = tmp_path / "pool"
    work.mkdir()
    daemons: list[Process] = []
    old_path = os.environ["PATH"]
    os.environ["PATH"] = env_path  # Process() passes the environment on
    try:
        for command in commands:
            for port, free in ports.items():
                command = command.replace(port, free)
            if command.endswith("&"):
                daemon = Process(["bash", "-c", "exec " + command[:-1]], cwd=work)
                daemons.append(daemon)
                ready = {
                    "xenpool-registrar": " started",
                    "xenpool-pe": "registered in pool Xen",
                    "xenpool-pu": "web2: running: ",
                }[command.split()[3]]
                daemon.wait_for(ready, timeout=60)
            elif command.startswith("xenpool-pu create"):
                pu = Process(["bash", "-c", "exec " + command], cwd=work)
                try:
                    pu.wait_for("web1: running: domain running", timeout=60)
                    pu.proc.send_signal(signal.SIGTERM)
                    assert pu.proc.wait(30) == 0, pu.drain()
                finally:
                    pu.stop()
            else:
                result = subprocess.run(
                    ["bash", "-c", command],
                    cwd=work,
                    capture_output=True,
                    text=True,
                    timeout=60,
                    env={**os.environ, "COLUMNS": "200"},
                )
                assert result.returncode == 0, (command, result.stderr)
                if command.startswith("xenpool status"):
                    assert "1/1 hosts up" in result.stdout, result.stdout
    finally:
        os.environ["PATH"] = old_path
        for daemon in reversed(daemons):
            daemon.stop()
    assert not (work / "twistd.pid").exists()


def test_xenpool_examples_copies_the_shipped_configs(fresh, tmp_path):
    venv, site, cwd, source = fresh
    out = run(venv / "bin" / "xenpool", "examples", tmp_path / "etc", cwd=cwd).stdout
    assert "10 files" in out
    for name in ("registrar.conf", "pe.conf", "vms.conf", "domain-test.xml"):
        assert (tmp_path / "etc" / name).read_bytes() == (
            site / "xenpool" / "etc" / name
        ).read_bytes()
    again = subprocess.run(
        [venv / "bin" / "xenpool", "examples", tmp_path / "etc"],
        cwd=cwd,
        capture_output=True,
        text=True,
    )
    assert again.returncode == 1 and "nothing copied" in again.stderr
