"""ONNX export, the onnxruntime engine (fp32, int8 dynamic / static QDQ), the build cache
and `stepserve build`; the TensorRT engine where TensorRT and a GPU exist."""

import asyncio
import subprocess
import sys

import httpx
import numpy as np
import onnx
import pytest
import torch

from stepserve.engines.build_cache import BuildCache, module_hash
from stepserve.engines.ort_engine import OnnxRuntimeEngine
from stepserve.engines.quantize import float_nodes
from stepserve.engines.registry import create_engine
from stepserve.models.builtin.loading import load_dit
from stepserve.server.app import create_app
from stepserve.server.settings import Settings

PROMPTS = ["a small red circle in the top left on a white background",
           "big blue square, right side, yellow background",
           "a green triangle", ""]


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("builds")


@pytest.fixture(scope="module")
def ort_engines(build_dir, encoder):
    return {(p, q): OnnxRuntimeEngine(precision=p, quantization=q, encoder=encoder,
                                      build_dir=build_dir, threads=1)
            for p, q in [("fp32", "static"), ("int8", "dynamic"), ("int8", "static")]}


def batch(engine, n, seed=0):
    """A mixed batch: different times, step sizes and prompt lengths."""
    gen = torch.Generator().manual_seed(seed)
    text = engine.encode([PROMPTS[i % len(PROMPTS)] for i in range(n)])
    return (torch.randn(n, 3, 32, 32, generator=gen), torch.rand(n, generator=gen),
            torch.tensor([0.0, 0.25, 0.5, 0.125] * n)[:n], text)


def rel(a, b):
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


@pytest.mark.slow  # the ort_engines fixture exports and quantizes three graphs (~15 s)
@pytest.mark.parametrize("n", [1, 5, 16])
def test_fp32_graph_matches_torch_at_any_batch_and_text_length(ort_engines, engine, n):
    args = batch(engine, n, seed=n)
    assert rel(ort_engines["fp32", "static"].denoise(*args), engine.denoise(*args)) < 1e-5


@pytest.mark.slow  # the ort_engines fixture exports and quantizes three graphs (~15 s)
def test_int8_graphs_stay_close_and_static_one_is_qdq(ort_engines, engine):
    args = batch(engine, 12)
    ref = engine.denoise(*args)
    fp32 = rel(ort_engines["fp32", "static"].denoise(*args), ref)
    for mode in ("dynamic", "static"):
        err = rel(ort_engines["int8", mode].denoise(*args), ref)
        assert fp32 * 100 < err < 0.08, (mode, err)  # really quantized, still close
    static = onnx.load(str(ort_engines["int8", "static"].graph_path))
    ops = {n.op_type for n in static.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    # activations of the first/last token-wise and 12 per-sample products stay float...
    kept = float_nodes(ort_engines["fp32", "static"].graph_path)
    assert len(kept) == 2 + 12
    # ...but every weight is stored as int8: the files are >= 3.5x smaller than fp32
    fp32_bytes = ort_engines["fp32", "static"].graph_path.stat().st_size
    for mode in ("dynamic", "static"):
        assert ort_engines["int8", mode].graph_path.stat().st_size * 3.5 < fp32_bytes
    floats = [i for i in static.graph.initializer if i.data_type == onnx.TensorProto.FLOAT]
    assert max(np.prod(i.dims) for i in floats) < 256 * 256  # biases and scales only


@pytest.mark.slow  # the ort_engines fixture exports and quantizes three graphs (~15 s)
def test_fp32_graph_gives_the_same_images_as_torch(ort_engines, engine, generate):
    from stepserve.server.scheduler.offline import generate_offline

    seeds = [11, 12, 13]
    ours = generate_offline(ort_engines["fp32", "static"], PROMPTS[:3], seeds, 4)
    ref = generate(PROMPTS[:3], seeds, steps=4).astype(np.float64)
    assert np.linalg.norm(ours - ref) / np.linalg.norm(ref) <= 1e-3


@pytest.mark.slow  # the ort_engines fixture exports and quantizes three graphs (~15 s)
def test_build_cache_reuses_builds_and_keys_on_weights(ort_engines, build_dir, encoder):
    again = OnnxRuntimeEngine(precision="int8", quantization="static", encoder=encoder,
                              build_dir=build_dir, threads=1)
    assert again.graph_path == ort_engines["int8", "static"].graph_path
    assert again.build_seconds < 1.0  # found, not rebuilt
    kinds = sorted(e["kind"] for e in BuildCache(build_dir).entries())
    assert kinds == ["onnx-fp32", "onnx-int8-dynamic", "onnx-int8-static"]
    other = load_dit()
    with torch.no_grad():
        other.patch_out.bias.add_(0.01)
    assert module_hash(other) != module_hash(load_dit())
    changed = OnnxRuntimeEngine(dit=other, encoder=encoder, build_dir=build_dir, threads=1)
    assert changed.graph_path != ort_engines["fp32", "static"].graph_path


@pytest.mark.slow  # ~9 s: the providers check comes after exporting the fp32 graph
def test_bad_engine_options_are_clear_errors(build_dir, encoder):
    with pytest.raises(ValueError, match="fp32 or int8"):
        OnnxRuntimeEngine(precision="bf16", encoder=encoder, build_dir=build_dir)
    with pytest.raises(ValueError, match="not available"):
        OnnxRuntimeEngine(providers=["CUDAExecutionProvider"], encoder=encoder,
                          build_dir=build_dir)
    with pytest.raises(ValueError, match="torch engine supports"):
        create_engine("torch", precision="fp8", encoder=encoder)


def test_torch_int8_weights_are_int8_and_close(engine, encoder):
    int8 = create_engine("torch", precision="int8", encoder=encoder, dit=engine.dit)
    assert "Int8" in type(int8.dit.blocks[0].mlp[0].weight).__name__
    assert type(engine.dit.blocks[0].mlp[0].weight) is torch.nn.Parameter  # source untouched
    args = batch(engine, 8)
    err = rel(int8.denoise(*args), engine.denoise(*args))
    assert 1e-5 < err < 0.02


def test_tensorrt_engine_needs_a_gpu_and_says_so(encoder):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present; see test_tensorrt_engine_matches_torch")
    with pytest.raises(RuntimeError, match="CUDA"):
        create_engine("tensorrt", device="cpu", encoder=encoder)


def test_tensorrt_engine_matches_torch(build_dir, encoder, engine):
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (CUDA machines only)")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT needs a CUDA GPU")
    trt = create_engine("tensorrt", precision="fp32", device="cuda", encoder=encoder,
                        build_dir=build_dir, max_batch_size=16)
    args = batch(engine, 8)
    assert rel(trt.denoise(*args).cpu(), engine.denoise(*args)) < 1e-3


@pytest.mark.slow  # the ort_engines fixture exports and quantizes three graphs (~15 s)
def test_server_serves_with_the_onnxruntime_engine(ort_engines):
    int8 = ort_engines["int8", "static"]
    app = create_app(Settings(engine="onnxruntime", precision="int8"), builder=lambda s: int8)
    app.state.runtime.start(background=False)

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://t") as c:
            r = await c.post("/v1/images/generations",
                             json={"prompt": PROMPTS[0], "num_inference_steps": 2, "seed": 3})
            return r, (await c.get("/metrics")).text

    try:
        r, metrics = asyncio.run(go())
    finally:
        app.state.runtime.shutdown()
    assert r.status_code == 200 and r.json()["data"][0]["b64_json"]
    assert "stepserve_engine_build_seconds" in metrics


@pytest.mark.slow  # `stepserve build` / `generate` subprocesses
def test_build_command_then_generate_uses_the_build(build_dir, tmp_path):
    def stepserve(*args):
        return subprocess.run([sys.executable, "-m", "stepserve.cli", *args],
                              capture_output=True, text=True, timeout=600)

    flags = ["--engine", "onnxruntime", "--precision", "int8", "--quantization", "dynamic",
             "--build-dir", str(build_dir), "--threads", "1"]
    r = stepserve("build", *flags, "--check-batch", "4")
    assert r.returncode == 0, r.stderr
    assert "relative_error_vs_torch_fp32=" in r.stdout
    err = float(r.stdout.split("relative_error_vs_torch_fp32=")[1].split()[0])
    assert 0 < err < 0.05
    listed = stepserve("build", "--list", "--build-dir", str(build_dir))
    assert "onnx-int8-dynamic" in listed.stdout
    r = stepserve("generate", PROMPTS[0], "--steps", "2", "--out", str(tmp_path), *flags)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "0000.png").is_file()
    assert stepserve("build", "--engine", "torch").returncode == 2


@pytest.mark.slow  # the ort_engines fixture exports and quantizes three graphs (~15 s)
def test_qsched_search_scores_the_whole_grid_picks_the_best_and_is_applied(ort_engines,
                                                                          tmp_path):
    import dataclasses
    import itertools

    from stepserve.engines.ort_engine import QSCHED_FILE
    from stepserve.engines.qsched_search import search_qsched
    from stepserve.models.sampling.qsched import QSched
    from stepserve.server.scheduler.offline import generate_offline

    int8 = ort_engines["int8", "dynamic"]
    grid = (0.9, 1.0, 1.1)
    result = search_qsched(int8, prompts=4, steps=2, grid=grid)
    # every (c_m, c_s) pair of the grid scored exactly once
    assert sorted((row[0], row[1]) for row in result.table) == sorted(
        itertools.product(grid, grid))
    scores = {(row[0], row[1]): row[4] for row in result.table}
    # each row's score is agreement minus the palette term (quality_weight 1)
    assert all(0 < row[2] <= 1 and row[3] >= 0 and row[4] == pytest.approx(row[2] - row[3])
               for row in result.table)
    # the chosen pair is the best-scoring row, and identity_score is the (1, 1) row
    assert result.score == max(scores.values())
    assert scores[result.best.model, result.best.sample] == result.score
    assert result.identity_score == scores[1.0, 1.0]
    # the pair really reaches the sampler during the search: the rows do not all agree
    assert len(set(scores.values())) > 1, result.table
    if not result.best.identity:  # a correction was chosen: it changes the images
        plain = int8.info

        def images(qsched):
            int8.info = dataclasses.replace(plain, qsched=qsched)
            try:
                return generate_offline(int8, PROMPTS[:2], [0, 1], 2)
            finally:
                int8.info = plain

        assert not np.array_equal(images(result.best), images(None))
    # a stored pair is picked up by a new engine on the same build and reaches the sampler
    QSched(1.1, 0.9).save(int8.graph_path.parent / QSCHED_FILE)
    try:
        again = OnnxRuntimeEngine(precision="int8", quantization="dynamic",
                                  encoder=int8.encoder, build_dir=int8.graph_path.parents[1],
                                  threads=1)
        assert again.info.qsched == QSched(1.1, 0.9)
        from stepserve.server.scheduler.offline import generate_offline

        with_q = generate_offline(again, PROMPTS[:1], [0], 4)
        again.info = dataclasses.replace(again.info, qsched=None)
        without = generate_offline(again, PROMPTS[:1], [0], 4)
        assert not np.array_equal(with_q, without)
    finally:
        (int8.graph_path.parent / QSCHED_FILE).unlink()


@pytest.mark.slow  # the ort_engines fixture exports and quantizes three graphs (~15 s)
def test_adapter_rows_fall_back_to_torch_and_are_counted(ort_engines, engine, tmp_path):
    from stepserve.models.lora.library import LoraLibrary
    from stepserve.models.lora.testing import random_builtin_adapter
    from stepserve.server.scheduler.offline import generate_offline
    from stepserve.server.scheduler.request import LoraChoice

    random_builtin_adapter(engine.dit, tmp_path / "warm.safetensors", rank=4, std=0.05)
    ort = ort_engines["fp32", "static"]
    for e in (ort, engine):
        e.loras = LoraLibrary([tmp_path])
    plan = [(), (LoraChoice("warm"),), (), (LoraChoice("warm", 0.5),)]
    before = ort.lora_fallback_rows
    ours = generate_offline(ort, PROMPTS, [1, 2, 3, 4], 3, guidance=1.0, lora=plan)
    assert ort.lora_fallback_rows - before == 2 * 3  # two adapter rows, three steps
    ref = generate_offline(engine, PROMPTS, [1, 2, 3, 4], 3, guidance=1.0, lora=plan)
    assert np.abs(ours.astype(int) - ref.astype(int)).max() <= 1
    plain = generate_offline(engine, PROMPTS, [1, 2, 3, 4], 3, guidance=1.0)
    assert np.abs(plain[1].astype(int) - ours[1].astype(int)).max() > 16
