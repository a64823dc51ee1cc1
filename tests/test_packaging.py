"""A non-editable install (what the Docker images do) carries every module, the built-in
model's weights and the playground: the wheel is built and its contents checked."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # builds the wheel with pip in a subprocess
ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"stepserve": "stepserve", "models": "stepserve/models",
           "engines": "stepserve/engines", "server": "stepserve/server",
           "loadtests": "stepserve/loadtests"}


def test_wheel_has_every_module_weights_and_playground(tmp_path):
    src = tmp_path / "src"  # a clean copy: setuptools would reuse a stale build/ folder
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for top in SOURCES:
        shutil.copytree(ROOT / top, src / top,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path), str(src)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("stepserve-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"{SOURCES[top]}/{p.relative_to(ROOT / top).as_posix()}"
                for top in SOURCES for p in (ROOT / top).rglob("*.py")}
    missing = sorted(expected - names)
    assert not missing, f"modules left out of the wheel: {missing}"
    for needed in ("stepserve/models/builtin/weights/dit.safetensors",
                   "stepserve/models/builtin/weights/classifier.safetensors",
                   "stepserve/server/static/playground.html"):
        assert needed in names

