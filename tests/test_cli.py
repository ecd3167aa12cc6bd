"""The `bert-accum` command: one entry point with a subcommand per tool, parsers inside the package, the
scripts as shims, and a regular (non-editable) install that carries the command and the grid files."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from bert_accum.cli import TOOLS, main

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("tool", list(TOOLS))
def test_every_tool_has_help(tool, capsys):
    with pytest.raises(SystemExit) as exc:
        main([tool, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: bert-accum {tool} ")


def test_the_command_lists_its_tools_and_refuses_unknown_ones(capsys):
    assert main(["--help"]) == 0
    listing = capsys.readouterr().out
    assert all(f"  {tool} " in listing for tool in TOOLS)
    assert main(["finetun"]) == 2
    assert "unknown tool 'finetun'" in capsys.readouterr().err
    assert main([]) == 2


def test_python_dash_m_runs_the_command():
    proc = subprocess.run([sys.executable, "-m", "bert_accum", "report", "--help"], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0 and proc.stdout.startswith("usage: bert-accum report")


def test_scripts_are_shims_over_the_package():
    for script in (REPO / "scripts").glob("*.py"):
        code = [line for line in script.read_text().split('"""')[-1].splitlines() if line.strip()]
        assert len(code) <= 6 and "argparse" not in script.read_text(), script.name
        assert any("script_main(" in line for line in code), script.name


def test_a_regular_install_carries_the_command_and_the_grid_files(tmp_path):
    """The wheel (what `pip install .` installs) declares `bert-accum` and holds configs/*.yaml as package data."""
    src = tmp_path / "src"  # a copy: the build writes build/ and *.egg-info into the tree it builds
    for part in ("bert_accum", "configs"):
        shutil.copytree(REPO / part, src / part, ignore=shutil.ignore_patterns("__pycache__"))
    for part in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / part, src / part)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), str(src)], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and "bdist_wheel" in proc.stderr + proc.stdout:
        pytest.skip("this setuptools cannot build wheels without build isolation (no network in tests)")
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = tmp_path.glob("bert_accum-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for grid in (REPO / "configs").glob("*.yaml"):
        assert f"bert_accum/configs/{grid.name}" in names
    assert "bert_accum/configs/accelerate/multi_gpu.yaml" in names and "bert_accum/__main__.py" in names
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "bert-accum = bert_accum.cli:main" in entry_points


def test_the_demo_uses_the_cores_the_load_leaves_idle(monkeypatch):
    from bert_accum import cli

    monkeypatch.setattr(cli.os, "cpu_count", lambda: 2)
    for load, threads in ((0.1, 2), (0.9, 1), (3.5, 1)):
        monkeypatch.setattr(cli.os, "getloadavg", lambda load=load: (load, load, load))
        assert cli.idle_cores() == threads
