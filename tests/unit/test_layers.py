"""The layer map, enforced: imports point down only, and across layers only through the API.

    wire (1) <- request (2) <- host (3) <- adjust (4) <- image (5) <- daemon (6: cli, config,
    plugin, logs, metrics, health, resync, ...)

``image`` reads the container's image for its loader (I/O, so not part of the pure adjustment
layer); it builds on the adjust and host APIs and is used by the plugin and ``inspect``.

``nri_plugin.errors`` is the shared base every layer may import. Code of one layer imports another
layer only as ``from nri_plugin.<layer> import <name>`` with ``<name>`` in that layer's
``__all__``, never a submodule; nothing outside ``nri_plugin.wire`` imports the generated
``_gen`` modules. Tests and tools may reach into modules (they test them); the package may not.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "nri_plugin"
LAYERS = {"wire": 1, "request": 2, "host": 3, "adjust": 4, "image": 5}
DAEMON = 6


def _layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) >= 2 and parts[1] in LAYERS:
        return parts[1]
    if len(parts) >= 2 and parts[1] == "errors":
        return "errors"
    return "daemon"


def _rank(layer: str) -> int:
    return 0 if layer == "errors" else LAYERS.get(layer, DAEMON)


def _imports() -> list[tuple[str, int, str, list[str]]]:
    """(file, line, imported module, names) of every nri_plugin import in the package."""
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if "_gen" in path.parts:
            continue
        rel = path.relative_to(PACKAGE.parent)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("nri_plugin"):
                out.append((str(rel), node.lineno, node.module, [a.name for a in node.names]))
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("nri_plugin"):
                        out.append((str(rel), node.lineno, alias.name, []))
    return out


def _source_layer(file: str) -> str:
    return _layer(file.removesuffix(".py").replace("/", "."))


def test_the_scan_sees_the_package() -> None:
    found = _imports()
    assert len(found) > 50
    assert {_source_layer(f) for f, *_ in found} >= {*LAYERS, "daemon"}


def test_imports_point_down_only() -> None:
    bad = [
        f"{f}:{line}: {_source_layer(f)} imports {module} ({_layer(module)})"
        for f, line, module, _ in _imports()
        if _rank(_layer(module)) > _rank(_source_layer(f))
    ]
    assert not bad, "\n".join(bad)


def test_other_layers_are_used_only_through_their_api() -> None:
    bad = []
    for f, line, module, names in _imports():
        src, tgt = _source_layer(f), _layer(module)
        if tgt in (src, "errors", "daemon"):
            continue
        if module != f"nri_plugin.{tgt}":
            bad.append(f"{f}:{line}: imports {module}; use `from nri_plugin.{tgt} import ...`")
            continue
        api = set(importlib.import_module(module).__all__)
        bad += [f"{f}:{line}: {n} is not in nri_plugin.{tgt}.__all__" for n in names if n not in api]
    assert not bad, "\n".join(bad)


def test_generated_code_only_inside_wire() -> None:
    bad = [
        f"{f}:{line}: {module}"
        for f, line, module, _ in _imports()
        if "_gen" in module.split(".") and _source_layer(f) != "wire"
    ]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_each_layer_declares_an_api_that_resolves(layer: str) -> None:
    module = importlib.import_module(f"nri_plugin.{layer}")
    assert module.__all__, layer
    for name in module.__all__:
        assert getattr(module, name) is not None, (layer, name)
