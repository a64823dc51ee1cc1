"""`stepserve bench openloop` against a live server: the table it prints is real traffic."""

import json
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # a live server and `stepserve` CLI subprocesses


def test_openloop_bench_reports_served_requests(live_server, tmp_path):
    raw = tmp_path / "samples.json"
    r = subprocess.run([sys.executable, "-m", "stepserve.cli", "bench", "openloop",
                        "--url", live_server.url, "--rate", "4", "--duration", "3",
                        "--steps", "1,2", "--json", str(raw)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    header, row = [line for line in r.stdout.splitlines() if line.startswith("|")][:2]
    cols = [c.strip() for c in header.strip("|").split("|")]
    cells = dict(zip(cols, (c.strip() for c in row.strip("|").split("|"))))
    samples = json.loads(raw.read_text())[0]["samples"]
    assert len(samples) >= 3  # ~12 Poisson arrivals expected in 3 s at 4/s
    assert all(s["status"] == 200 for s in samples)
    assert int(cells["ok"]) == len(samples) and int(cells["errors"]) == 0
    # 2-step requests stream one preview, which arrives before the final image
    streamed = [s for s in samples if s["steps"] == 2]
    assert streamed and all(0 < s["first_preview_s"] < s["latency_s"] for s in streamed)
    assert float(cells["p50_s"]) > 0


def test_bench_rejects_unknown_benchmark():
    r = subprocess.run([sys.executable, "-m", "stepserve.cli", "bench", "nope"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "invalid choice" in r.stderr


def test_lora_and_slo_benches_print_their_tables(tmp_path):
    import json
    import subprocess
    import sys

    out = tmp_path / "lora.json"
    subprocess.run([sys.executable, "-m", "stepserve.cli", "bench", "lora", "--requests", "8",
                    "--adapters", "2", "--ranks", "4", "--rounds", "1", "--in-flight", "4",
                    "--json", str(out)], check=True, capture_output=True, timeout=600)
    rows = json.loads(out.read_text())
    assert rows["speed"][0]["adapters"] == 2 and rows["speed"][0]["mixed_img_s"] > 0
    assert {r["rows"] for r in rows["rank"]} == {"none", "rank 4", "2 distinct"}
    out = tmp_path / "slo.json"
    subprocess.run([sys.executable, "-m", "stepserve.cli", "bench", "slo", "--loads", "2",
                    "--duration", "3", "--steps", "2", "--saturation-s", "3", "--threads", "1",
                    "--max-batch-size", "4", "--budgets", "1024", "--low-steps", "4",
                    "--json", str(out)], check=True, capture_output=True, timeout=600)
    result = json.loads(out.read_text())
    assert [r["policy"] for r in result["rows"]] == ["off", "forecast", "auto"]
    urgent = result["priority"][0]
    assert urgent["busy_s"] > 0 and urgent["max_grey_diff_resumed"] <= 2
    assert all(r["offered"] > 0 and 0 <= r["goodput"] <= 1 for r in result["rows"])
    served = [r for r in result["rows"] if r["goodput"] > 0]
    assert served and all(0 <= r["all_five"] <= 100 and r["mean_steps"] >= 1 for r in served)


def test_noise_bench_reads_variety_of_left_out_attributes(tmp_path):
    from stepserve.loadtests.noise_scale import evenness, left_out_prompts

    assert evenness(np.array([0, 1, 0, 1, -1]), 2) == pytest.approx(1.0)
    assert evenness(np.array([3, 3, 3]), 9) == 0.0
    prompts = left_out_prompts(30, "position")
    assert not any(" the " in p for p in prompts) and all("background" in p for p in prompts)
    assert not any(p.split()[1] in ("small", "large") for p in left_out_prompts(30, "size"))
    out = tmp_path / "noise.json"
    subprocess.run([sys.executable, "-m", "stepserve.cli", "bench", "noise", "--scales",
                    "1,0.8", "--prompts", "4", "--left-out", "6", "--steps", "1",
                    "--json", str(out)], check=True, capture_output=True, timeout=600)
    rows = json.loads(out.read_text())
    assert [r["noise_scale"] for r in rows] == [1.0, 0.8]
    assert all(0 <= r["background left out: evenness"] <= 1 for r in rows)
    assert rows[0]["seen@1 FD"] != rows[1]["seen@1 FD"]  # the scale reaches the sampler
