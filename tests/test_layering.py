"""lib_ti must import and work without any webui; only lib_ti/hosts may touch the host's modules."""

from __future__ import annotations

import ast
import subprocess
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HOST_MODULES = {"modules", "gradio", "launch", "backend"}


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
        "bad = sorted(n for n in sys.modules if n.split('.')[0] in {'modules', 'gradio', 'diffusers', 'transformers'})\n"
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


def test_only_the_host_adapter_module_imports_the_webui():
    """lib_ti/hosts/a1111.py is the one place that knows the webui's internals (modules.*)."""
    for path in (ROOT / "lib_ti").rglob("*.py"):
        if path.name == "a1111.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            assert not any(n.split(".")[0] == "modules" for n in names), f"{path} imports {names}"
