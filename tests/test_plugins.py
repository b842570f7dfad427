"""Plugin loading and checking (xenpool.plugins), the built-in load metrics, and the
example third-party plugin in examples/xenpool-ram-load installed for real."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import types
from pathlib import Path
from typing import NamedTuple

import pytest
from zope.interface import implementer

from xenpool.hookspecs import hookimpl
from xenpool.interfaces import ILoadMetric, LoadSample
from xenpool.plugins import PluginError, UnknownProvider, load_plugins

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "xenpool-ram-load"
BUILTIN_LOAD_METRICS = {"max", "cpu", "weighted"}


# -- the built-ins, found through the entry point -------------------------------------


def test_entry_point_brings_the_builtin_load_metrics():
    plugins = load_plugins()
    # Other installed plugins may add metrics; these three come from the "builtin" entry point.
    builtin = {p.name for p in plugins.providers("load") if p.plugin == "builtin"}
    assert builtin == BUILTIN_LOAD_METRICS
    assert BUILTIN_LOAD_METRICS <= set(plugins.names("load"))


def test_without_entry_points_there_are_no_providers():
    plugins = load_plugins(entry_points=False)
    assert plugins.names("load") == []


def test_create_weighted_with_options():
    metric = load_plugins().create("load", "weighted", cpu=0.5, ram=0.5)
    assert ILoadMetric.providedBy(metric)
    assert (metric.cpu_weight, metric.ram_weight) == (0.5, 0.5)
    assert metric.load(LoadSample(cpu=0.5, ram=0.25)) == 0.375


def test_unknown_name_lists_the_installed_names():
    plugins = load_plugins()
    with pytest.raises(UnknownProvider) as caught:
        plugins.create("load", "no-such-metric")
    message = str(caught.value)
    assert "'no-such-metric'" in message
    assert f"installed: {', '.join(plugins.names('load'))}" in message
    for name in BUILTIN_LOAD_METRICS:
        assert name in message
    assert isinstance(caught.value, LookupError)
    assert isinstance(caught.value, PluginError)


def test_unknown_name_with_nothing_installed_says_none():
    with pytest.raises(UnknownProvider, match="installed: none"):
        load_plugins(entry_points=False).get("load", "max")


@pytest.mark.parametrize(
    "options, detail",
    [
        pytest.param({"cpu": -0.5}, "cpu=-0.5", id="negative"),
        pytest.param({"cpu": 0, "ram": 0}, "cpu=0.0, ram=0.0", id="both-zero"),
        pytest.param({"cpu": "lots"}, "lots", id="not-a-number"),
        pytest.param({"disk": 0.5}, "disk", id="unknown-option"),
    ],
)
def test_bad_weights_raise_plugin_error_naming_the_plugin(options, detail):
    with pytest.raises(PluginError) as caught:
        load_plugins().create("load", "weighted", **options)
    message = str(caught.value)
    assert "'weighted'" in message
    assert detail in message


# -- checks on what plugins register ----------------------------------------------------


def plugin_module(name: str, register_load_metrics) -> types.ModuleType:
    """A plugin module named ``name`` whose load-metric hook calls ``register_load_metrics``."""
    module = types.ModuleType(name)

    @hookimpl
    def xenpool_register_load_metrics(register):
        register_load_metrics(register)

    module.xenpool_register_load_metrics = xenpool_register_load_metrics
    return module


@implementer(ILoadMetric)
class Constant:
    name = "constant"

    def load(self, sample: LoadSample) -> float:
        return 0.5


def test_a_plugin_module_registers_through_the_hook():
    module = plugin_module(
        "good_plugin", lambda register: register("constant", Constant)
    )
    plugins = load_plugins(entry_points=False, modules=[module])
    assert plugins.names("load") == ["constant"]
    provider = plugins.get("load", "constant")
    assert (provider.plugin, provider.factory) == ("good_plugin", Constant)
    assert plugins.create("load", "constant").load(LoadSample(cpu=1, ram=1)) == 0.5


def test_class_lacking_load_names_the_plugin_and_the_method():
    @implementer(ILoadMetric)
    class NoLoad:
        name = "no-load"

    module = plugin_module("lazy_plugin", lambda register: register("no-load", NoLoad))
    with pytest.raises(PluginError) as caught:
        load_plugins(entry_points=False, modules=[module])
    message = str(caught.value)
    assert "'lazy_plugin'" in message
    assert "'no-load'" in message
    assert "ILoadMetric" in message
    assert (
        "ILoadMetric.load(sample)" in message
    )  # the missing method, as zope.interface names it
    assert "not provided" in message


def test_class_not_declaring_the_interface_is_refused():
    class Undeclared:
        name = "undeclared"

        def load(self, sample):
            return 0.0

    module = plugin_module(
        "shy_plugin", lambda register: register("undeclared", Undeclared)
    )
    with pytest.raises(
        PluginError, match=r"plugin 'shy_plugin'.*does not implement ILoadMetric"
    ):
        load_plugins(entry_points=False, modules=[module])


def test_factory_function_is_checked_when_it_makes_an_object():
    def make_metric():
        return types.SimpleNamespace(name="fake")  # no interface, no load()

    module = plugin_module(
        "factory_plugin", lambda register: register("fake", make_metric)
    )
    plugins = load_plugins(
        entry_points=False, modules=[module]
    )  # a function cannot be checked yet
    assert plugins.names("load") == ["fake"]
    with pytest.raises(PluginError) as caught:
        plugins.create("load", "fake")
    message = str(caught.value)
    assert "'factory_plugin'" in message
    assert "'fake'" in message
    assert "does not provide ILoadMetric" in message


def test_factory_function_making_a_good_object_is_accepted():
    module = plugin_module(
        "factory_plugin", lambda register: register("constant", lambda: Constant())
    )
    metric = load_plugins(entry_points=False, modules=[module]).create(
        "load", "constant"
    )
    assert isinstance(metric, Constant)


def test_duplicate_name_from_two_plugins_names_both():
    first = plugin_module("first_plugin", lambda register: register("same", Constant))
    second = plugin_module("second_plugin", lambda register: register("same", Constant))
    with pytest.raises(PluginError) as caught:
        load_plugins(entry_points=False, modules=[first, second])
    message = str(caught.value)
    assert "'first_plugin'" in message
    assert "'second_plugin'" in message
    assert "'same'" in message


def test_duplicate_of_a_builtin_names_the_builtin_plugin():
    module = plugin_module("copycat", lambda register: register("max", Constant))
    with pytest.raises(PluginError) as caught:
        load_plugins(modules=[module])
    message = str(caught.value)
    assert "'copycat'" in message
    assert "'builtin'" in message
    assert "'max'" in message


def test_example_plugin_module_passes_the_checks_without_installing():
    spec = importlib.util.spec_from_file_location(
        "xenpool_ram_load_from_checkout", EXAMPLE / "src" / "xenpool_ram_load.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    plugins = load_plugins(entry_points=False, modules=[module])
    assert plugins.names("load") == ["ram-only"]
    metric = plugins.create("load", "ram-only")
    assert metric.name == "ram-only"
    assert metric.load(LoadSample(cpu=0.9, ram=0.3)) == 0.3
    assert metric.load(LoadSample(cpu=0.0, ram=1.5)) == 1.0


# -- the prototype's load formulas ------------------------------------------------------

# (cpu, ram) -> (max, cpu, weighted); fractions of powers of two, so every result is
# exact in binary floating point and can be compared with ==.
FORMULA_TABLE = [
    pytest.param(0.0, 0.0, 0.0, 0.0, 0.0, id="idle"),
    pytest.param(0.5, 0.25, 0.5, 0.5, 0.4375, id="cpu-bound"),
    pytest.param(0.25, 0.5, 0.5, 0.25, 0.3125, id="ram-bound"),
    pytest.param(0.75, 0.75, 0.75, 0.75, 0.75, id="even"),
    pytest.param(0.125, 0.0, 0.125, 0.125, 0.09375, id="no-ram"),
    pytest.param(1.0, 0.0, 1.0, 1.0, 0.75, id="cpu-full"),
    pytest.param(0.0, 1.0, 1.0, 0.0, 0.25, id="ram-full"),
    pytest.param(1.0, 1.0, 1.0, 1.0, 1.0, id="full"),
    pytest.param(
        1.125, 0.0, 1.0, 1.0, 0.84375, id="cpu-overcommitted-weighted-below-1"
    ),
    pytest.param(1.25, 0.5, 1.0, 1.0, 1.0, id="cpu-overcommitted-weighted-capped"),
    pytest.param(0.5, 1.5, 1.0, 0.5, 0.75, id="ram-over-1"),
    pytest.param(0.0, 2.0, 1.0, 0.0, 0.5, id="ram-2"),
    pytest.param(4.0, 4.0, 1.0, 1.0, 1.0, id="both-far-over"),
    pytest.param(-0.25, 0.0, 0.0, 0.0, 0.0, id="negative-capped-to-0"),
]


@pytest.fixture(scope="module")
def builtin():
    plugins = load_plugins()
    return {name: plugins.create("load", name) for name in sorted(BUILTIN_LOAD_METRICS)}


@pytest.mark.parametrize(
    "cpu, ram, expect_max, expect_cpu, expect_weighted", FORMULA_TABLE
)
def test_builtin_metrics_on_the_table(
    builtin, cpu, ram, expect_max, expect_cpu, expect_weighted
):
    sample = LoadSample(cpu=cpu, ram=ram)
    assert builtin["max"].load(sample) == expect_max
    assert builtin["cpu"].load(sample) == expect_cpu
    assert builtin["weighted"].load(sample) == expect_weighted


def cap(value: float) -> float:
    return min(max(value, 0.0), 1.0)


PROTOTYPE = {
    "max": lambda cpu, ram: cap(max(cpu, ram)),
    "cpu": lambda cpu, ram: cap(cpu),
    "weighted": lambda cpu, ram: cap(0.75 * cpu + 0.25 * ram),
}

# Everyday values that are not exact in binary, compared with the formula computed the
# same way: still exactly equal.
SAMPLES = [
    (0.0, 0.0),
    (0.9, 0.3),
    (0.3, 0.9),
    (0.1, 0.2),
    (0.33, 0.66),
    (0.999, 0.001),
    (1.0, 0.7),
    (1.01, 0.0),
    (0.2, 1.3),
    (2.7, 3.1),
    (0.0, 0.45),
    (0.61, 0.0),
]


@pytest.mark.parametrize("name", sorted(PROTOTYPE))
@pytest.mark.parametrize("cpu, ram", SAMPLES)
def test_builtin_metrics_follow_the_prototype_formula(builtin, name, cpu, ram):
    got = builtin[name].load(LoadSample(cpu=cpu, ram=ram))
    assert got == PROTOTYPE[name](cpu, ram)
    assert 0.0 <= got <= 1.0


def test_weighted_defaults_are_the_prototypes():
    metric = load_plugins().create("load", "weighted")
    assert (metric.cpu_weight, metric.ram_weight) == (0.75, 0.25)


# -- the example plugin, pip-installed into a throwaway venv ---------------------------


def _pip(python: Path | str, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [str(python), "-m", "pip", *args], capture_output=True, text=True, timeout=600
    )
    # pip may warn about unreachable find-links / index locations; only the status counts.
    assert result.returncode == 0, (
        f"pip {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    )
    return result


def _ensure_build_tools(python: Path) -> None:
    """--no-build-isolation builds with this venv's own setuptools (and, before
    setuptools 70.1, wheel's bdist_wheel); missing ones go into the throwaway venv
    ``python``, never into this one."""
    missing = [
        name
        for name in ("setuptools", "wheel")
        if importlib.util.find_spec(name) is None
    ]
    if missing:
        _pip(python, "install", "--quiet", *missing)


class ThrowawayVenv(NamedTuple):
    python: Path
    site: Path  # its own site-packages, where the example is installed


@pytest.fixture(scope="module")
def ram_load_installed(tmp_path_factory) -> ThrowawayVenv:
    """examples/xenpool-ram-load installed (not editable) into a throwaway venv layered
    on the one running the tests: the throwaway venv's own site-packages come first, then
    this venv's (with its .pth files, so xenpool, pip and pytest are there as here). The
    venv running the tests is never changed.

    Built from a copy so the build leaves no build/ or *.egg-info in the checkout."""
    base = tmp_path_factory.mktemp("example")
    venv = base / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)],
        check=True,
        timeout=120,
    )
    python = venv / "bin" / "python"
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = Path(
        subprocess.run(
            [python, "-c", purelib], capture_output=True, text=True, check=True
        ).stdout.strip()
    )
    ours = dict.fromkeys(
        [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    )
    (site / "zz-layered-on-the-test-venv.pth").write_text(
        "import site; "
        + "; ".join(f"site.addsitedir({path!r})" for path in ours)
        + "\n"
    )
    _ensure_build_tools(python)
    source = base / EXAMPLE.name
    shutil.copytree(
        EXAMPLE,
        source,
        ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"),
    )
    _pip(python, "install", "--quiet", "--no-deps", "--no-build-isolation", str(source))
    return ThrowawayVenv(python, site)


CHECK_INSTALLED = textwrap.dedent(
    """
    import json, sys
    from xenpool.interfaces import LoadSample
    from xenpool.plugins import load_plugins

    plugins = load_plugins()
    metric = plugins.create("load", "ram-only")
    print(json.dumps({
        "names": plugins.names("load"),
        "plugin": plugins.get("load", "ram-only").plugin,
        "load": metric.load(LoadSample(cpu=0.9, ram=0.3)),
        "module": sys.modules["xenpool_ram_load"].__file__,
    }))
    """
)


@pytest.mark.slow
def test_installed_example_plugin_is_found_through_its_entry_point(
    ram_load_installed, tmp_path
):
    python, site = ram_load_installed
    # A fresh interpreter: entry points are read from the installed metadata at start-up.
    result = subprocess.run(
        [python, "-c", CHECK_INSTALLED],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert "ram-only" in found["names"]
    assert BUILTIN_LOAD_METRICS <= set(found["names"])
    assert found["plugin"] == "xenpool-ram-load:ram-load"
    assert found["load"] == 0.3
    assert os.path.dirname(found["module"]) == str(
        site
    )  # the installed copy, in the throwaway venv
    assert (
        importlib.util.find_spec("xenpool_ram_load") is None
    )  # and not in the venv running the tests

    # The example's own tests pass against the installed package.
    result = subprocess.run(
        [
            python,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            str(EXAMPLE / "tests"),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------- entry-point mistakes


def _fake_distribution(
    root, name: str, entry_points: str, module: str | None = None, source: str = ""
) -> None:
    info = root / f"{name}-0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0\n")
    (info / "entry_points.txt").write_text(entry_points)
    if module:
        (root / f"{module}.py").write_text(source)


def test_a_third_party_entry_point_cannot_shadow_the_builtins(tmp_path, monkeypatch):
    _fake_distribution(
        tmp_path,
        "shadow",
        "[xenpool]\nbuiltin = shadow_plugin\n",
        "shadow_plugin",
        "from xenpool.hookspecs import hookimpl\n"
        "from xenpool_plugins.load import CpuLoad\n"
        "class Fancy(CpuLoad):\n    name = 'fancy'\n"
        "@hookimpl\ndef xenpool_register_load_metrics(register):\n    register('fancy', Fancy)\n",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    plugins = load_plugins()
    assert {"max", "cpu", "weighted", "fancy"} <= set(plugins.names("load"))
    assert plugins.get("load", "fancy").plugin == "shadow:builtin"


def test_a_plugin_that_cannot_be_imported_is_named_and_disabled(tmp_path, monkeypatch):
    _fake_distribution(tmp_path, "broken", "[xenpool]\nbroken = no_such_module_here\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    plugins = load_plugins()  # the others still load
    assert {"max", "cpu", "weighted"} <= set(plugins.names("load"))
    [why] = plugins.broken.values()
    assert why.startswith(
        "plugin 'broken:broken' (no_such_module_here) cannot be loaded"
    )
    with pytest.raises(PluginError, match="disabled: plugin 'broken:broken'"):
        plugins.get("stonith", "whatever-it-provided")


NO_FENCE_PLUGIN = """
from zope.interface import implementer
from xenpool.hookspecs import hookimpl
from xenpool.interfaces import IStonith, ILoadMetric

@implementer(IStonith)
class NoFence:  # no fence()
    name = "nofence"

@implementer(ILoadMetric)
class Fine:
    name = "fine-load"
    def load(self, sample):
        return 0.0

@hookimpl
def xenpool_register_stonith(register):
    register("nofence", NoFence)

@hookimpl
def xenpool_register_load_metrics(register):
    register("fine-load", Fine)
"""


def test_a_stonith_without_fence_disables_only_itself(tmp_path, monkeypatch):
    _fake_distribution(
        tmp_path,
        "halfdone",
        "[xenpool]\nhalf = halfdone_plugin\n",
        "halfdone_plugin",
        NO_FENCE_PLUGIN,
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    plugins = load_plugins()
    assert "nofence" not in plugins.names("stonith")
    assert {"fence-agent", "manual"} <= set(plugins.names("stonith"))
    assert "fine-load" in plugins.names("load")  # its other provider is fine
    assert list(plugins.broken) == ["stonith nofence"]
    with pytest.raises(PluginError) as caught:
        plugins.create("stonith", "nofence")
    message = str(caught.value)
    assert "'halfdone:half'" in message and "does not implement IStonith" in message
    assert "fence" in message and message.endswith("(disabled)")


def test_a_third_party_plugin_with_an_unknown_hook_is_disabled(tmp_path, monkeypatch):
    _fake_distribution(
        tmp_path,
        "typo",
        "[xenpool]\ntypo = typo_dist_plugin\n",
        "typo_dist_plugin",
        "from xenpool.hookspecs import hookimpl\n"
        "@hookimpl\ndef xenpool_register_stonit(register):\n    pass\n",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    plugins = load_plugins()
    assert (
        "unknown hook 'xenpool_register_stonit'" in plugins.broken["plugin typo:typo"]
    )
    assert "fence-agent" in plugins.names("stonith")


def test_broken_plugins_in_real_processes(tmp_path, monkeypatch):
    """``xenpool plugins`` lists the rest with one warning per broken plugin; a PE told
    to use the broken stonith stops with one line; a registrar starts."""
    _fake_distribution(
        tmp_path,
        "halfdone",
        "[xenpool]\nhalf = halfdone_plugin\n",
        "halfdone_plugin",
        NO_FENCE_PLUGIN,
    )
    _fake_distribution(tmp_path, "gone", "[xenpool]\ngone = gone_module_missing\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "COLUMNS": "200"}
    bin_dir = Path(sys.executable).parent
    listed = subprocess.run(
        [bin_dir / "xenpool", "plugins"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert listed.returncode == 0, listed.stderr
    assert "fence-agent" in listed.stdout and "fine-load" in listed.stdout
    warnings = listed.stderr.strip().splitlines()
    assert len(warnings) == 2, listed.stderr
    assert any(
        "stonith 'nofence'" in w and "does not implement IStonith" in w
        for w in warnings
    )
    assert any(
        "'gone:gone' (gone_module_missing) cannot be loaded" in w for w in warnings
    )
    pe = subprocess.run(
        [bin_dir / "twistd", "-n", "--pidfile=", "xenpool-pe", "--stonith=nofence"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
    )
    assert pe.returncode != 0
    assert "Traceback" not in pe.stdout + pe.stderr
    [line] = pe.stderr.strip().splitlines()
    assert (
        line.startswith("xenpool-pe: --stonith:")
        and "does not implement IStonith" in line
    )
    # a registrar (it loads every pool policy) starts, warning once about each
    from .daemons import Daemon, free_port

    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    registrar = Daemon(
        "xenpool-registrar",
        f"--asap=tcp:{free_port()}:interface=127.0.0.1",
        ready=" started",
        cwd=tmp_path,
    )
    try:
        log = registrar.drain()
        lines = log.splitlines()
        assert sum("does not implement IStonith" in x for x in lines) == 1, log
        assert sum("gone_module_missing" in x for x in lines) == 1, log
        assert "Traceback" not in log
    finally:
        registrar.stop()


def test_a_misspelt_hook_is_reported():
    plugin = types.ModuleType("typo_plugin")

    @hookimpl
    def xenpool_register_load_metric(register):  # missing "s"
        pass

    plugin.xenpool_register_load_metric = xenpool_register_load_metric
    with pytest.raises(
        PluginError, match="unknown hook 'xenpool_register_load_metric'"
    ):
        load_plugins(entry_points=False, modules=[plugin])


def test_a_hook_with_the_wrong_argument_is_reported():
    plugin = types.ModuleType("wrong_argument_plugin")

    @hookimpl
    def xenpool_register_load_metrics(add):
        pass

    plugin.xenpool_register_load_metrics = xenpool_register_load_metrics
    with pytest.raises(PluginError, match="wrong_argument_plugin"):
        load_plugins(entry_points=False, modules=[plugin])


def test_create_passes_the_plugin_sets_reactor_to_factories_that_take_one():
    from twisted.internet.testing import MemoryReactorClock

    reactor = MemoryReactorClock()
    plugins = load_plugins(reactor=reactor)
    nbd = plugins.create("storage", "nbd")
    assert nbd._reactor is reactor  # NbdStorage(reactor=None, timeout_s=...)
    other = MemoryReactorClock()
    assert (
        plugins.create("storage", "nbd", reactor=other)._reactor is other
    )  # an explicit one wins
    assert (
        plugins.create("load", "weighted").load(LoadSample(cpu=0.0, ram=0.0)) == 0.0
    )  # takes none: given none
    assert (
        load_plugins().create("storage", "nbd")._reactor is None
    )  # none given: the global one, when needed
