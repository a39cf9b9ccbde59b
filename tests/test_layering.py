"""The architecture, enforced: layers that import only downwards, no import cycles, and no webui
outside lib_ti/hosts (lib_ti must import and work without any webui)."""

from __future__ import annotations

import ast
import subprocess
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HOST_MODULES = {"modules", "gradio", "launch", "backend"}

# Lowest first: a module may import its own layer and the layers before it, never a later one.
# Top-level modules of lib_ti are named by file; sub-packages by folder. Everything not named is "core".
LAYERS = [
    ("foundation", {"errors", "fileio", "options", "families", "libraries"}),
    ("formats", {"embedding", "formats"}),  # the embedding type and the files it is read from and written to
    ("core", set()),  # the training loop and everything it needs: config, data, engine seam, checkpoints, ...
    ("engines", {"engines"}),
    ("models", {"models"}),
    ("dataset", {"dataset"}),
    ("hosts", {"hosts"}),
    ("remote", {"remote"}),  # a running webui over HTTP: the client and built-in-trainer driver of micro/ and bench/
    ("micro", {"micro"}),
    ("bench", {"bench"}),
    ("cli", {"cli", "__main__"}),
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every lib_ti module ``path`` imports, at module level or inside functions."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("lib_ti")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("lib_ti"):
                continue
            for alias in node.names:  # "from . import events" imports the module lib_ti.events
                sub = f"{target}.{alias.name}"
                found.add(sub if _exists(sub) else target)
    return found - {name}


def _exists(module: str) -> bool:
    base = ROOT.joinpath(*module.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def import_graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in (ROOT / "lib_ti").rglob("*.py")}


def layer_of(module: str) -> int:
    parts = module.split(".")
    key = parts[1] if len(parts) > 1 else "__init__"
    for rank, (_, names) in enumerate(LAYERS):
        if key in names:
            return rank
    return [name for name, _ in LAYERS].index("core")


def test_layers_import_only_downwards():
    wrong = [f"{m} ({LAYERS[layer_of(m)][0]}) imports {t} ({LAYERS[layer_of(t)][0]})"
             for m, targets in import_graph().items() for t in targets if layer_of(t) > layer_of(m)]
    assert not wrong, "\n".join(sorted(wrong))


def test_nothing_outside_the_hosts_imports_them():
    """remote/ drives a webui over HTTP; the core, the CLI and the benchmarks never import the adapters."""
    wrong = [f"{m} imports {t}" for m, targets in import_graph().items() for t in targets
             if t.startswith("lib_ti.hosts") and not m.startswith("lib_ti.hosts")]
    assert not wrong, wrong


def test_there_are_no_import_cycles():
    """Counting imports inside functions too: a cycle hidden in a function is still a cycle."""
    graph = import_graph()
    cycles = [sorted(c) for c in _strongly_connected(graph) if len(c) > 1]
    assert not cycles, cycles


def test_the_cycle_check_finds_a_cycle():
    assert [sorted(c) for c in _strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) if len(c) > 1] \
        == [["a", "b", "c"]]


def _strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's algorithm, iterative enough for a few hundred modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            out.append(component)

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_core_never_imports_the_host_at_module_level():
    for path in (ROOT / "lib_ti").rglob("*.py"):
        if "hosts" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            assert not {n.split(".")[0] for n in names} & HOST_MODULES, f"{path} imports {names}"


def test_every_module_imports_in_a_clean_interpreter_without_host_or_heavy_libraries():
    code = (
        "import importlib, pkgutil, sys, lib_ti\n"
        "for m in pkgutil.walk_packages(lib_ti.__path__, 'lib_ti.'):\n"
        "    m.name.endswith('__main__') or importlib.import_module(m.name)\n"
        "heavy = {'modules', 'gradio', 'diffusers', 'transformers'}\n"
        "bad = sorted(n for n in sys.modules if n.split('.')[0] in heavy)\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


def fake_host(monkeypatch, with_train_tabs: bool):
    """A fake of the host's callback registry: enough to unit-test the glue, not proof of integration."""
    registered: dict[str, list] = {"ui_tabs": [], "ui_train_tabs": []}
    callbacks = types.ModuleType("modules.script_callbacks")
    callbacks.on_ui_tabs = registered["ui_tabs"].append
    if with_train_tabs:
        callbacks.on_ui_train_tabs = registered["ui_train_tabs"].append
    modules = types.ModuleType("modules")
    modules.script_callbacks = callbacks
    monkeypatch.setitem(sys.modules, "modules", modules)
    monkeypatch.setitem(sys.modules, "modules.script_callbacks", callbacks)
    return registered


def load_entry_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("ti_trainer_entry", ROOT / "scripts" / "ti_trainer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_entry_script_registers_the_tab_where_the_host_allows(monkeypatch):
    registered = fake_host(monkeypatch, with_train_tabs=True)
    load_entry_script()
    assert len(registered["ui_train_tabs"]) == 1 and len(registered["ui_tabs"]) == 1

    registered = fake_host(monkeypatch, with_train_tabs=False)  # SD.Next: no such hook, no AttributeError
    load_entry_script()
    assert len(registered["ui_tabs"]) == 1


def test_top_level_tab_only_when_the_train_tab_hook_never_ran(monkeypatch):
    from lib_ti.hosts import webui_tab

    monkeypatch.setattr(webui_tab, "_build", lambda: "blocks")
    monkeypatch.setitem(webui_tab._state, "in_train_tab", False)
    assert webui_tab.on_ui_tabs() == [("blocks", "Train Embedding", "ti_trainer_top_tab")]
    monkeypatch.setitem(webui_tab._state, "in_train_tab", True)
    assert webui_tab.on_ui_tabs() == []


def _webui_imports(tree: ast.AST) -> list[str]:
    names = []
    for node in ast.walk(tree):
        found = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
        names += [n for n in found if n.split(".")[0] in {"modules", "backend", "modules_forge", "ldm_patched"}]
    return names


def test_only_the_host_adapters_import_the_webui_and_only_lazily():
    """lib_ti/hosts/ is the one place that knows the webui's internals (modules.*), always inside functions, so
    every module imports without a webui; detect.py reads attributes of what it is given and imports none."""
    for path in (ROOT / "lib_ti").rglob("*.py"):
        tree = ast.parse(path.read_text())
        if "hosts" not in path.parts or path.name == "detect.py":
            assert not _webui_imports(tree), f"{path} imports {_webui_imports(tree)}"
            continue
        top_level = ast.Module(body=[n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)],
                               type_ignores=[])
        assert not _webui_imports(top_level), f"{path} imports {_webui_imports(top_level)} at module level"
