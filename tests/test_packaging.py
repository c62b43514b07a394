"""What an install of askd holds and how it imports: every package listed, the Triton kernels under the askd
namespace (never a top-level ``kernels``, which PyPI's Hugging Face ``kernels`` or any kernels.py on sys.path
would shadow), and the config presets as real files."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """``setup.py build_py`` into a temporary folder: what a wheel holds, without compiling the extension."""
    tmp = tmp_path_factory.mktemp("build")
    cmd = [sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp), "build_py", "--build-lib",
           str(tmp / "lib")]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
    return tmp / "lib"


def test_pyproject_lists_every_package():
    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "askd").rglob("__init__.py")}
    assert set(packages) == found | {"askd.kernels"}


def test_a_built_package_holds_the_kernels_under_askd(built):
    assert (built / "askd" / "kernels" / "cbam.py").is_file()
    assert (built / "askd" / "kernels" / "cosine_distill.py").is_file()
    assert not (built / "kernels").exists()


def test_a_built_package_ships_the_presets(built, tmp_path):
    """The presets are real files in the package and resolve from it, with the checkout not on the path."""
    shipped = built / "askd" / "configs" / "official_ir50.toml"
    assert shipped.is_file() and not shipped.is_symlink()
    find = "from askd.config import resolve_config; print(resolve_config('official_ir50'))"
    env = {**os.environ, "PYTHONPATH": str(built)}
    found = subprocess.run([sys.executable, "-c", find], cwd=tmp_path, env=env, check=True, capture_output=True,
                           text=True).stdout.strip()
    assert found == str(shipped)


def test_a_kernels_module_first_on_the_path_changes_nothing(tmp_path):
    """A user's kernels.py before askd on sys.path: askd imports, its Triton backend
    resolves to askd.kernels from this checkout and never imports the stranger."""
    pytest.importorskip("triton", reason="triton is not importable: its backend cannot resolve here")
    (tmp_path / "kernels.py").write_text("raise ImportError('the wrong kernels module was imported')\n")
    probe = (
        "import sys, askd, askd.nn, askd.losses\n"
        "from askd import backend\n"
        "import askd.kernels.cbam as k\n"
        "assert 'kernels' not in sys.modules, sys.modules['kernels']\n"
        "print(backend.availability('cpu')['triton']); print(k.__file__)\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    reason, path = proc.stdout.split()
    assert reason == "None"
    assert Path(path) == REPO / "kernels" / "cbam.py"
