"""The rooms of the package: the core and the drift controls never import the study tooling, and the public
kit is importable without loading torch until a kit name is used."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "bert_accum"


def _imports(path: Path) -> set[str]:
    """Absolute names of every module `path` imports (relative imports resolved against its package)."""
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names.add(module)
            names.update(f"{module}.{a.name}" for a in node.names)
    return names


@pytest.mark.parametrize("room", ["core", "controls"])
def test_core_and_controls_never_import_the_study_tooling(room):
    files = sorted((PACKAGE / room).rglob("*.py"))
    assert files
    for path in files:
        bad = sorted(n for n in _imports(path) if n.startswith("bert_accum.study"))
        assert not bad, f"{path.relative_to(PACKAGE.parent)} imports {bad}"


def test_kit_and_integrations_never_import_the_study_tooling():
    for path in [PACKAGE / "kit.py", *sorted((PACKAGE / "integrations").rglob("*.py"))]:
        bad = sorted(n for n in _imports(path) if n.startswith("bert_accum.study"))
        assert not bad, f"{path.relative_to(PACKAGE.parent)} imports {bad}"


def test_public_api_is_listed_and_import_is_cheap():
    code = ("import sys, bert_accum; assert 'torch' not in sys.modules, 'import bert_accum loaded torch'; "
            "names = sorted(bert_accum.__all__); [getattr(bert_accum, n) for n in names]; print(' '.join(names))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    for name in ("WindowSampler", "WindowCollator", "install_invariant_dropout", "window_loss_scales",
                 "check_accelerator", "ExactAccumulationTrainer"):
        assert name in out
