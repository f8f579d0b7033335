"""The import rule of docs/architecture.md, enforced by import-linter's contracts in
pyproject.toml: the tree keeps them, and a deliberately upward import breaks them."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(*args: str, cwd: Path = ROOT, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = result.stdout + result.stderr
    return f"exit {result.returncode}\n{output}"


def test_the_source_tree_keeps_every_import_contract() -> None:
    output = lint_imports()
    assert output.startswith("exit 0\n"), output
    assert "Contracts: 2 kept, 0 broken." in output


def test_an_upward_import_breaks_the_layers_contract(tmp_path: Path) -> None:
    # A copy of the package in which core imports the server: the contract must catch it.
    shutil.copytree(ROOT / "src" / "mlx_relay", tmp_path / "mlx_relay")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    tasks = tmp_path / "mlx_relay" / "core" / "tasks.py"
    tasks.write_text(tasks.read_text() + "\nimport mlx_relay.server.app  # upward\n")
    output = lint_imports(cwd=tmp_path, env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin"})
    assert output.startswith("exit 1\n"), output
    assert "Contracts: 0 kept, 2 broken." in output  # monitoring now reaches it through core
    assert "mlx_relay.core is not allowed to import mlx_relay.server" in output
    assert "- mlx_relay.core.tasks -> mlx_relay.server.app" in output
