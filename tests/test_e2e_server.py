"""End to end: a real uvicorn subprocess serving the built-in model, driven by the
official `openai` client (streaming included), plus disconnects and SIGTERM."""

import base64
import io
import signal
import threading
import time

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from server_process import ServerProcess
from stepserve.models.builtin.yardstick import Yardstick, prompt_set

pytestmark = pytest.mark.slow  # server subprocesses
PROMPT = "a large yellow triangle at the bottom left on a blue background"


@pytest.fixture(scope="module")
def server(live_server):
    return live_server


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def decode(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def test_openai_client_generate_follows_prompt(client):
    ps = prompt_set("seen", 6)
    images = []
    for prompt, seed in zip(ps.prompts, ps.seeds):
        r = client.images.generate(model="builtin", prompt=prompt, size="32x32",
                                   response_format="b64_json",
                                   extra_body={"num_inference_steps": 4, "seed": seed})
        images.append(decode(r.data[0].b64_json))
    acc = Yardstick().accuracy(np.stack(images), ps.labels)
    assert acc["all_five"] >= 50, acc


def test_server_matches_generate_without_server(client, generate):
    r = client.images.generate(prompt=PROMPT, response_format="b64_json",
                               extra_body={"num_inference_steps": 4, "seed": 11,
                                           "guidance_scale": 3.0})
    direct = generate([PROMPT], [11], steps=4, guidance=3.0)[0]
    served = decode(r.data[0].b64_json)
    assert np.abs(served.astype(int) - direct.astype(int)).max() <= 2


def test_openai_client_streaming_partial_images(client):
    stream = client.images.generate(prompt=PROMPT, stream=True, partial_images=2,
                                    response_format="b64_json",
                                    extra_body={"num_inference_steps": 8, "seed": 3})
    events = list(stream)
    kinds = [e.type for e in events]
    assert kinds == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    previews = [decode(e.b64_json) for e in events]
    assert all(p.shape == (32, 32, 3) for p in previews)
    # previews are real x0 predictions: the last one is closer to the final than the first
    final = previews[-1].astype(float)
    assert np.abs(previews[1] - final).mean() <= np.abs(previews[0] - final).mean() + 1e-6


def test_openai_client_errors_name_the_field(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.images.generate(prompt="x", n=0)
    assert err.value.body["param"] == "n"
    with pytest.raises(openai.NotFoundError):
        client.images.generate(prompt="x", model="dall-e-3")


def test_url_results_and_models(server, client):
    r = client.images.generate(prompt=PROMPT, response_format="url", output_format="webp",
                               size="128x128")
    img = httpx.get(r.data[0].url, timeout=10)
    assert img.status_code == 200 and Image.open(io.BytesIO(img.content)).size == (128, 128)
    assert [m.id for m in client.models.list()] == ["builtin"]


def metric(server, name: str) -> float:
    for line in httpx.get(f"{server.url}/metrics").text.splitlines():
        if line.startswith(name):
            return float(line.split()[-1])
    return 0.0


def wait_for_cancel(server, before: float, steps_before: float, full_work: int) -> None:
    """The request is counted cancelled and leaves the running set within a step or two,
    long before all of its denoising work (`full_work` image-steps) was done."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if (metric(server, 'stepserve_requests_total{status="cancelled"}') > before
                and metric(server, "stepserve_running_requests") == 0):
            break
        time.sleep(0.1)
    assert metric(server, 'stepserve_requests_total{status="cancelled"}') == before + 1
    assert metric(server, "stepserve_running_requests") == 0
    assert metric(server, "stepserve_queue_depth") == 0
    time.sleep(0.5)
    assert metric(server, "stepserve_denoising_steps_total") - steps_before < full_work / 2


def test_disconnected_stream_leaves_the_batch(server):
    before = metric(server, 'stepserve_requests_total{status="cancelled"}')
    steps_before = metric(server, "stepserve_denoising_steps_total")
    with httpx.Client(timeout=30) as c, c.stream(
            "POST", f"{server.url}/v1/images/generations",
            json={"prompt": PROMPT, "stream": True, "partial_images": 3,
                  "num_inference_steps": 64}) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                break  # first preview arrived: walk away
    wait_for_cancel(server, before, steps_before, full_work=64)


def test_disconnected_plain_request_leaves_the_batch(server):
    before = metric(server, 'stepserve_requests_total{status="cancelled"}')
    steps_before = metric(server, "stepserve_denoising_steps_total")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/images/generations", timeout=0.5,
                   json={"prompt": PROMPT, "num_inference_steps": 64, "n": 8})
    wait_for_cancel(server, before, steps_before, full_work=64 * 8)


def test_sigterm_finishes_in_flight_work_then_exits():
    srv = ServerProcess("--threads", "1")
    srv.wait_ready()
    result = {}

    def slow_request():
        result["r"] = httpx.post(f"{srv.url}/v1/images/generations",
                                 json={"prompt": PROMPT, "num_inference_steps": 48},
                                 timeout=120)

    t = threading.Thread(target=slow_request)
    t.start()
    time.sleep(1.0)
    srv.proc.send_signal(signal.SIGTERM)
    t.join(timeout=120)
    assert result["r"].status_code == 200 and result["r"].json()["data"][0]["b64_json"]
    # uvicorn re-raises the captured SIGTERM after its graceful shutdown
    assert srv.proc.wait(timeout=60) in (0, -signal.SIGTERM)
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{srv.url}/health", timeout=2)
