"""The layout keeps its promises: the core reaches plugins only through their contracts."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORE = ROOT / "xenpool"
#: The one module that may name the built-in plugins' package: the plugin loader.
LOADER = CORE / "plugins.py"


def _resolve(path: Path, level: int, module: str | None) -> str:
    """The absolute name of a relative import ``from .{level}module import ...`` in ``path``."""
    package = list(path.relative_to(ROOT).with_suffix("").parts)
    if path.name != "__init__.py":
        package = package[:-1]
    base = package[: len(package) - (level - 1)] if level > 1 else package
    return ".".join(base + ([module] if module else []))


def _imported_modules(path: Path) -> set[str]:
    """Every absolute module an import statement of ``path`` names, and every string
    constant that looks like a dotted module name (``importlib.import_module("x.y")``,
    ``python -m x.y`` command lines)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(path, node.level, node.module)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            found.update(
                word
                for word in node.value.split()
                if word.startswith("xenpool_plugins")
            )
    return found


def test_nothing_in_the_core_imports_the_builtin_plugins_but_the_loader():
    modules = sorted(CORE.rglob("*.py"))
    assert len(modules) > 20
    offenders = {
        str(path.relative_to(ROOT)): sorted(
            name
            for name in _imported_modules(path)
            if name.split(".")[0] == "xenpool_plugins"
        )
        for path in modules
        if path != LOADER
    }
    assert not {path: names for path, names in offenders.items() if names}


def test_the_pool_element_does_not_import_the_pool_user():
    # What both use (the ASAP client) lives in a neutral module, xenpool.asap_client.
    offenders = {
        str(path.relative_to(ROOT)): sorted(
            n
            for n in _imported_modules(path)
            if n == "xenpool.pu" or n.startswith("xenpool.pu.")
        )
        for path in sorted((CORE / "pe").rglob("*.py"))
    }
    assert not {path: names for path, names in offenders.items() if names}
    assert "xenpool.asap_client" in _imported_modules(CORE / "pe" / "tap.py")


def test_the_daemons_do_not_import_the_developer_tools():
    # xenpool/tools/ (demos, fuzzer, benchmarks, process helpers) sits on top: the command
    # line and the chaos bed may use it, the daemons and their contracts never do.
    users = {
        CORE / "cli.py",
        *(CORE / "chaos").rglob("*.py"),
        *(CORE / "tools").rglob("*.py"),
    }
    offenders = {
        str(path.relative_to(ROOT)): sorted(
            n for n in _imported_modules(path) if n.startswith("xenpool.tools")
        )
        for path in sorted(CORE.rglob("*.py"))
        if path not in users
    }
    assert not {path: names for path, names in offenders.items() if names}


def test_the_benchmarks_share_one_module_not_each_others_privates():
    for path in sorted((CORE / "tools").glob("bench_*.py")):
        for name in _imported_modules(path):
            if name.startswith("xenpool.tools.bench_"):
                raise AssertionError(
                    f"{path.name} imports {name}: shared code belongs in xenpool/tools/bench.py"
                )
    tree = ast.parse((CORE / "tools" / "bench.py").read_text(encoding="utf-8"))
    assert "BenchError" in {
        node.name for node in tree.body if isinstance(node, ast.ClassDef)
    }


def test_the_core_uses_the_hypervisor_through_its_contract():
    # What the PE needs of a hypervisor (measures_cpu, cpu_wait_ns, node_info) is declared
    # in IHypervisor: no probing for optional members, no calls of a plugin's privates.
    for path in sorted(CORE.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        for probe in (
            "hasattr(self.hypervisor",
            "getattr(self.hypervisor",
            "hypervisor._",
        ):
            assert probe not in text, f"{path.relative_to(ROOT)}: {probe}"
