"""`stepserve generate` end to end, as a user runs it (a real subprocess)."""

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.slow  # `stepserve` CLI subprocesses


def stepserve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stepserve.cli", *args],
                          capture_output=True, text=True, timeout=300)


def test_generate_writes_pngs_in_prompt_order_and_is_seeded(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a small red circle in the top left on a white background\n\n"
                       "a large blue square at the bottom right on a black background\n")
    r = stepserve("generate", "--prompts-file", str(prompts), "--steps", "2", "--seed", "7",
                  "--out", str(tmp_path / "a"), "--threads", "1")
    assert r.returncode == 0, r.stderr
    assert "images=2" in r.stdout and "images_per_s=" in r.stdout
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == ["0000.png", "0001.png"]
    img = np.asarray(Image.open(tmp_path / "a" / "0001.png"))
    assert img.shape == (32, 32, 3)
    # prompt i uses seed S+i: the second prompt alone with seed 8 gives the same image
    r = stepserve("generate", "a large blue square at the bottom right on a black background",
                  "--steps", "2", "--seed", "8", "--out", str(tmp_path / "b"), "--threads", "1")
    assert r.returncode == 0, r.stderr
    assert np.array_equal(np.asarray(Image.open(tmp_path / "b" / "0000.png")), img)


def test_generate_rejects_bad_input(tmp_path):
    r = stepserve("generate", "--out", str(tmp_path))
    assert r.returncode == 2 and "PROMPT" in r.stderr
    r = stepserve("generate", "x", "--steps", "0", "--out", str(tmp_path))
    assert r.returncode == 2 and "--steps" in r.stderr
    r = stepserve("generate", "x", "--size", "512x512", "--out", str(tmp_path))
    assert r.returncode == 2 and "32x32" in r.stderr
    r = stepserve("generate", "x", "--precision", "int3")
    assert r.returncode == 2 and "precision" in r.stderr
