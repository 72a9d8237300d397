"""The dependency rule (ARCHITECTURE.md), checked by import-linter's contracts in pyproject.toml."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_import_contracts_hold():
    lint = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "broken" not in result.stdout.lower().replace("0 broken", "")


def test_gateway_starts_without_any_ml_framework():
    code = ("import sys; import services.gateway.app, workers.app, percept.cli; "
            "from percept.services import catalog; catalog(); "
            "bad = [m for m in ('torch', 'tensorflow', 'numpy', 'dlib', 'diffusers') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_is_clean():
    """The type checker over the core, the services and the workers (pyproject's [tool.mypy] files)."""
    mypy = Path(sys.executable).parent / "mypy"
    result = subprocess.run([str(mypy), "--no-incremental"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr
