"""The CPU image run as a user would (podman, as its non-root user): ready, a generation
with the official openai client from outside the container, /metrics, and SIGTERM
draining to exit 0 within the grace period the manifests declare.

The image is built once by scripts/build-image.sh (minutes) unless it exists. These
tests skip only where podman cannot run containers at all."""

import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import openai
import pytest

from server_process import free_port
from stepserve.loadtests.launch import wait_ready

ROOT = Path(__file__).resolve().parents[1]
IMAGE = "localhost/stepserve:cpu"
# runc: crun, podman's default runtime, cannot run on cgroup v1 hybrid hosts
RUN = ["podman", "--runtime", "runc", "run", "--network", "host",
       "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]

pytestmark = pytest.mark.slow  # builds and runs a container image


def podman_works() -> str | None:
    """Why podman cannot run containers here (None: it can)."""
    if shutil.which("podman") is None or shutil.which("runc") is None:
        return "podman and runc are not installed (apt-get install podman buildah runc)"
    probe = subprocess.run(["podman", "--runtime", "runc", "info"], capture_output=True,
                           text=True, timeout=60)
    return None if probe.returncode == 0 else f"podman cannot run: {probe.stderr[-300:]}"


@pytest.fixture(scope="module")
def image():
    why = podman_works()
    if why:
        pytest.skip(why)
    if subprocess.run(["podman", "image", "exists", IMAGE]).returncode != 0:
        subprocess.run(["bash", "scripts/build-image.sh"], cwd=ROOT, check=True, timeout=3600)
    return IMAGE


def grace_period() -> int:
    text = (ROOT / "deploy" / "k8s" / "base" / "api.yaml").read_text()
    return int(re.search(r"terminationGracePeriodSeconds: (\d+)", text).group(1))


def test_the_cpu_image_serves_and_drains_as_its_non_root_user(image):
    port = free_port()
    name = f"stepserve-smoke-{port}"
    subprocess.run([*RUN, "-d", "--name", name, image, "serve", "--port", str(port),
                    "--threads", "1", "--warmup-batch-sizes", "1"], check=True,
                   capture_output=True, timeout=120)
    try:
        url = f"http://127.0.0.1:{port}"
        ready_s = wait_ready(url)
        uid = subprocess.run(["podman", "exec", name, "id", "-u"], capture_output=True,
                             text=True, check=True).stdout.strip()
        assert uid == "10001"  # the image's non-root user
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        r = client.images.generate(prompt="a small red circle in the top left on a white "
                                   "background", extra_body={"seed": 1})
        assert r.data[0].b64_json and r.stepserve["steps"] == 4
        metrics = httpx.get(f"{url}/metrics").text
        assert "stepserve_ready 1.0" in metrics
        assert "stepserve_images_generated_total 1.0" in metrics
        start = time.monotonic()
        subprocess.run(["podman", "kill", "-s", "TERM", name], check=True, capture_output=True)
        code = subprocess.run(["podman", "wait", name], capture_output=True, text=True,
                              timeout=grace_period() + 30).stdout.strip()
        drained_s = time.monotonic() - start
        assert code == "0" and drained_s < grace_period()
        print(f"ready in {ready_s:.1f} s, drained in {drained_s:.1f} s")
    finally:
        subprocess.run(["podman", "rm", "-f", name], capture_output=True)
