"""The import contracts of pyproject.toml's [tool.importlinter], checked by import-linter.

``plugins`` (the built-ins) import only what ``agent`` exports, as a third party's plugin
would; ``agent`` (the core) never imports a plugin.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytest.importorskip("importlinter", reason="import-linter is in the test extra")


def lint_imports(cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    script = "import sys; from importlinter.cli import lint_imports_command as run; sys.exit(run())"
    command = [sys.executable, "-c", script, "--no-cache", str(ROOT / "pyproject.toml")]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


def test_the_import_contracts_are_kept() -> None:
    done = lint_imports(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 kept, 0 broken" in done.stdout


def test_a_plugin_importing_an_agent_submodule_breaks_the_contract(tmp_path: Path) -> None:
    fake = tmp_path / "plugins"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "sneaky.py").write_text("from agent import hookimpl\n"
                                    "from agent.deploys import DeployRunner\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    done = lint_imports(tmp_path, env)
    assert done.returncode != 0
    assert "plugins.sneaky -> agent.deploys" in done.stdout
