"""Errors a user sees on the command line (issue 14): one `error:` line and status 2 for a
bad value or a missing file, status 1 when a served model fails to load, `interrupted` and
130 on Ctrl-C, no traceback; progress bars on stderr for long runs (off when stderr is not
a terminal, unless --progress)."""

import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

from stepserve.cli import main


def one_error_line(capsys) -> str:
    """The single `error:` line on stderr (and no traceback)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and err.strip().endswith(lines[0]), err
    return lines[0]


@pytest.fixture
def no_uvicorn(monkeypatch):
    """A test fails, rather than serving forever, if the command starts uvicorn."""
    import uvicorn

    def run(self, *args, **kwargs):
        raise AssertionError("uvicorn started")

    monkeypatch.setattr(uvicorn.Server, "run", run)


@pytest.fixture
def no_cuda(monkeypatch):
    """A CPU-only torch, also on a machine with a GPU."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


# -- serve / worker: a model that cannot load stops the command ---------------------------


def test_serve_and_worker_refuse_a_missing_model_before_starting(tmp_path, capsys,
                                                                 no_uvicorn):
    missing = str(tmp_path / "nonexistent")
    assert main(["serve", "--model", missing]) == 2
    assert one_error_line(capsys) == (f"error: --model {missing}: not 'builtin' and not a "
                                      "diffusers folder (no model_index.json)")
    assert main(["worker", "--redis-url", "redis://127.0.0.1:1", "--model", missing]) == 2
    assert "not a diffusers folder" in one_error_line(capsys)


def test_serve_refuses_a_missing_model_in_the_config_file(tmp_path, capsys, no_uvicorn):
    config = tmp_path / "models.toml"
    config.write_text('[[models]]\npath = "builtin"\n\n'
                      f'[[models]]\npath = "{tmp_path / "gone"}"\nname = "gone"\n')
    assert main(["serve", "--config", str(config)]) == 2
    assert f"[[models]] path {tmp_path / 'gone'}: not 'builtin'" in one_error_line(capsys)


def test_serve_refuses_a_device_or_engine_it_cannot_have(capsys, monkeypatch, no_uvicorn,
                                                         no_cuda):
    assert main(["serve", "--device", "cuda"]) == 2
    assert "--device cuda:" in one_error_line(capsys)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # no `stepserve[onnx]` extra
    assert main(["serve", "--engine", "onnxruntime"]) == 2
    assert "pip install 'stepserve[onnx]'" in one_error_line(capsys)


def test_serve_exits_1_when_the_model_fails_to_load_in_the_background(capsys, monkeypatch):
    import stepserve.server.runtime as runtime

    def broken(*args, **kwargs):
        raise ValueError("boom")

    monkeypatch.setattr(runtime, "create_engine", broken)
    result = []
    thread = threading.Thread(target=lambda: result.append(
        main(["serve", "--host", "127.0.0.1", "--port", "0", "--log-level", "warning"])),
        daemon=True)
    thread.start()
    thread.join(60)
    assert not thread.is_alive(), "serve kept running after its model failed to load"
    assert result == [1]
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == "error: model failed to load: ValueError: boom"


# -- generate ------------------------------------------------------------------------------


def test_generate_missing_prompts_file(tmp_path, capsys):
    assert main(["generate", "--prompts-file", str(tmp_path / "missing.txt")]) == 2
    missing = tmp_path / "missing.txt"
    assert one_error_line(capsys) == f"error: --prompts-file {missing}: no such file"
    assert main(["generate", "--prompts-file", str(tmp_path)]) == 2  # a folder
    assert "cannot read it" in one_error_line(capsys)


def test_generate_cuda_on_a_cpu_only_torch(tmp_path, capsys, no_cuda):
    assert main(["generate", "x", "--device", "cuda", "--out", str(tmp_path)]) == 2
    line = one_error_line(capsys)
    assert line.startswith("error: --device cuda: ") and "--device cpu" in line
    assert main(["generate", "x", "--device", "gpu", "--out", str(tmp_path)]) == 2
    assert "use cpu, cuda or cuda:N" in one_error_line(capsys)


def test_onnxruntime_engine_without_the_onnx_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    for argv in (["generate", "x", "--out", str(tmp_path / "out")], ["eval", "--steps", "1"],
                 ["build"]):
        assert main([*argv, "--engine", "onnxruntime", "--build-dir", str(tmp_path)]) == 2
        assert "pip install 'stepserve[onnx]'" in one_error_line(capsys)


def test_generate_bad_values_fail_before_any_work(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("")
    assert main(["generate", "x", "--out", str(afile)]) == 2
    assert one_error_line(capsys) == f"error: --out {afile}: exists and is not a folder"
    assert main(["generate", "x", "--seed", str(2**70), "--out", str(tmp_path)]) == 2
    assert "--seed" in one_error_line(capsys)
    assert main(["generate", "x", "--max-batch-size", "0", "--out", str(tmp_path)]) == 2
    assert one_error_line(capsys) == ("error: invalid settings: max_batch_size: Input should be "
                                      "greater than or equal to 1 (got 0)")
    assert main(["generate", "x", "--device", "cpu,cpu", "--out", str(tmp_path)]) == 2
    assert "one device" in one_error_line(capsys)


def test_ctrl_c_during_generate(tmp_path, capsys, monkeypatch):
    import stepserve.server.scheduler.offline as offline

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(offline, "generate_offline", interrupted)
    try:
        status = main(["generate", "x", "--out", str(tmp_path)])
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped the command")
    assert status == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == "interrupted" and "Traceback" not in err


# -- eval ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("flags", "message"), [
    (["--prompts", "0"], "error: --prompts 0: the Frechet distance needs at least 2 prompts"),
    (["--prompts", "1"], "error: --prompts 1: the Frechet distance needs at least 2 prompts"),
    (["--steps", "4,x"], "error: --steps 4,x: give comma-separated whole numbers"),
    (["--sets", "foo"], "error: --sets foo: unknown set 'foo'; use seen and/or unseen"),
    (["--steps", "65"], "error: --steps 65: each must be between 1 and max_steps (64)"),
    (["--steps", "0"], "error: --steps 0: each must be between 1 and max_steps (64)"),
    (["--steps", "1,3", "--max-steps", "2"], "error: --steps 1,3: each must be between 1 and "
                                             "max_steps (2)"),
    (["--weights", "/nonexistent/dit.safetensors"], "error: --weights /nonexistent/"),
    (["--json", "/nonexistent/rows.json"], "error: --json /nonexistent/rows.json: not a file"),
    (["--model", "/nonexistent"], "error: --model /nonexistent: eval measures the built-in"),
])
def test_eval_bad_values(flags, message, capsys):
    argv = ["eval", "--steps", "1", "--prompts", "2", *flags]
    assert main(argv) == 2
    assert one_error_line(capsys).startswith(message)


# -- build, train-builtin ------------------------------------------------------------------


def test_build_bad_values(tmp_path, capsys):
    assert main(["build", "--config", str(tmp_path / "missing.toml")]) == 2
    assert "config file not found" in one_error_line(capsys)
    base = ["build", "--engine", "onnxruntime", "--build-dir", str(tmp_path)]
    assert main([*base, "--check-batch", "0"]) == 2
    assert one_error_line(capsys) == "error: --check-batch 0: give 1 or more"
    assert main([*base, "--precision", "int8", "--qsched", "--qsched-steps", "0"]) == 2
    assert "--qsched-steps must be between 1 and max_steps (64)" in one_error_line(capsys)
    assert not any(tmp_path.iterdir())  # nothing was built


@pytest.fixture
def no_training(monkeypatch):
    import stepserve.models.builtin.classifier as classifier
    import stepserve.models.builtin.train as train

    def started(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(train, "train", started)
    monkeypatch.setattr(classifier, "train_classifier", started)


def test_train_builtin_bad_values(tmp_path, capsys, no_training):
    from stepserve.models.builtin.checkpoint import WEIGHTS_DIR

    out = tmp_path / "weights"  # a trained classifier: training would start with the DiT
    out.mkdir()
    for name in ("classifier.safetensors", "classifier.json"):
        shutil.copy(WEIGHTS_DIR / name, out / name)
    base = ["train-builtin", "--run-dir", str(tmp_path / "run"), "--out", str(out)]
    for flag, value in (("--steps", "0"), ("--batch", "0"), ("--classifier-steps", "0"),
                        ("--eval-every", "-1"), ("--threads", "0")):
        assert main([*base, flag, value]) == 2, flag
        assert one_error_line(capsys) == f"error: {flag} {value}: give " + (
            "0" if flag == "--eval-every" else "1") + " or more"
    afile = tmp_path / "afile"
    afile.write_text("")
    assert main(["train-builtin", "--run-dir", str(afile), "--out", str(out)]) == 2
    assert one_error_line(capsys) == f"error: --run-dir {afile}: exists and is not a folder"
    assert main([*base, "--lazydit-only"]) == 2
    assert "dit.safetensors does not exist" in one_error_line(capsys)
    assert main([*base, "--init-from", str(tmp_path / "none.safetensors")]) == 2
    assert one_error_line(capsys) == f"error: --init-from {tmp_path / 'none.safetensors'}: " \
        "no such file"
    assert main([*base, "--recipe", "v2", "--init-from", str(afile)]) == 2
    assert "--recipe v2 trains from scratch" in one_error_line(capsys)


# -- progress ------------------------------------------------------------------------------


def test_generate_progress_bar_and_the_same_images(tmp_path, capsys, engine):
    from stepserve.server.scheduler.offline import generate_offline

    prompts = [f"a {c} circle on a white background" for c in
               ("red", "blue", "green", "yellow", "black")]
    argv = ["generate", *prompts, "--steps", "2", "--seed", "7", "--max-batch-size", "2"]
    assert main([*argv, "--out", str(tmp_path / "quiet")]) == 0
    assert "generate:" not in capsys.readouterr().err  # stderr is not a terminal: no bar
    assert main([*argv, "--out", str(tmp_path / "bar"), "--progress"]) == 0
    err = capsys.readouterr().err
    assert "generate: 100%" in err and "5/5 images" in err
    # prompt i has seed 7+i, and the counted run gives the images of a plain one
    expected = generate_offline(engine, prompts, [7 + i for i in range(5)], 2,
                                max_batch_size=2)
    for name in ("quiet", "bar"):
        got = np.stack([np.asarray(Image.open(tmp_path / name / f"{i:04d}.png"))
                        for i in range(5)])
        assert np.array_equal(got, expected), name


def test_eval_progress_bar(capsys):
    argv = ["eval", "--steps", "1,2", "--prompts", "2", "--sets", "seen"]
    assert main(argv) == 0
    assert "eval:" not in capsys.readouterr().err
    assert main([*argv, "--progress"]) == 0
    captured = capsys.readouterr()
    assert "eval: 100%" in captured.err and "2 steps, 2/2 images" in captured.err
    assert "| seen | 2 |" in captured.out


# -- real processes ------------------------------------------------------------------------


def stepserve(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stepserve.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_serve_process_exits_on_a_missing_or_failing_model(tmp_path):
    r = stepserve("serve", "--model", str(tmp_path / "nonexistent"), "--port", "0")
    assert r.returncode == 2 and "Uvicorn running" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines() == [
        f"error: --model {tmp_path / 'nonexistent'}: not 'builtin' and not a diffusers folder "
        "(no model_index.json)"]
    # a cache the built-in model cannot run fails while loading, in the background
    r = stepserve("serve", "--cache", "deepcache", "--port", "0", "--threads", "1")
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: model failed to load: ")


@pytest.mark.slow
def test_ctrl_c_stops_generate_with_status_130(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a small red circle\n" * 5000)
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "stepserve.cli", "generate", "--prompts-file", str(prompts),
         "--steps", "32", "--threads", "1", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 120
    while not out.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)  # --out is made just before generating
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "interrupted" and "Traceback" not in err


def test_train_builtin_runs_the_v3_recipe_as_two_stages(tmp_path, monkeypatch):
    """The default recipe trains v2 in RUN_DIR/v2, then the v3 stage from its weights in
    RUN_DIR/v3; --init-from skips the first stage."""
    import stepserve.models.builtin.report as report
    import stepserve.models.builtin.train as train
    from stepserve.models.builtin.checkpoint import WEIGHTS_DIR

    calls = []
    monkeypatch.setattr(train, "train", lambda cfg, run_dir, out=None, **kw: calls.append(
        (cfg.captions, cfg.init_from, cfg.model.refine, run_dir, out)))
    monkeypatch.setattr(report, "plot_training", lambda *a: None)
    out, run = tmp_path / "weights", tmp_path / "run"
    out.mkdir()
    for name in ("classifier.safetensors", "classifier.json"):
        shutil.copy(WEIGHTS_DIR / name, out / name)
    assert main(["train-builtin", "--run-dir", str(run), "--out", str(out)]) == 0
    first = run / "v2" / "dit.safetensors"
    assert calls == [("v2", "", 0, run / "v2", first),
                     ("v3", str(first), 64, run / "v3", out / "dit.safetensors")]
    calls.clear()
    assert main(["train-builtin", "--run-dir", str(run), "--out", str(out),
                 "--init-from", str(WEIGHTS_DIR / "dit.safetensors")]) == 0
    assert calls == [("v3", str(WEIGHTS_DIR / "dit.safetensors"), 64, run / "v3",
                      out / "dit.safetensors")]
