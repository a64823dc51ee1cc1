"""The scale-out topology from the image, as deploy/compose.yaml starts it with
podman-compose: Redis, two API and two worker containers. 100 async jobs through both
API containers while a worker container is killed (SIGKILL): every job completes
exactly once, url results fetch from either API, and Redis restarted from its
append-only file has lost nothing."""

import importlib.util
import os
import subprocess
import sys
import time

import httpx
import pytest
from test_container import ROOT, podman_works

from server_process import free_port
from stepserve.loadtests.faults import Completions
from stepserve.loadtests.launch import wait_ready

pytestmark = pytest.mark.slow  # builds images and runs five containers
PROMPT = "a small red circle in the top left on a white background"


def compose(project: str, env: dict, *args: str, check: bool = True):
    # podman-compose from PyPI (dev extras): Debian's 1.0.3 adds a network to host-mode
    # containers, which podman refuses
    return subprocess.run([sys.executable, "-m", "podman_compose", "-p", project, "-f",
                           str(ROOT / "deploy" / "compose.yaml"), *args], env=env,
                          capture_output=True, text=True, check=check, timeout=600)


@pytest.fixture(scope="module")
def topology(tmp_path_factory):
    why = podman_works() or (None if importlib.util.find_spec("podman_compose") else
                             "podman-compose is not installed (pip install podman-compose)")
    if why:
        pytest.skip(why)
    for target, image in (("cpu", "localhost/stepserve:cpu"),
                          ("redis", "localhost/stepserve-redis:latest")):
        if subprocess.run(["podman", "image", "exists", image]).returncode != 0:
            subprocess.run(["bash", "scripts/build-image.sh"], cwd=ROOT, check=True,
                           timeout=3600, env={**os.environ, "TARGET": target})
    # runc and ulimits for every container compose starts (crun fails on this host)
    conf = tmp_path_factory.mktemp("podman") / "containers.conf"
    conf.write_text('[engine]\nruntime = "runc"\n[containers]\n'
                    'default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]\n')
    ports = {k: str(free_port()) for k in ("REDIS_PORT", "API1_PORT", "API2_PORT",
                                           "WORKER1_PORT", "WORKER2_PORT")}
    env = {**os.environ, **ports, "CONTAINERS_CONF": str(conf)}
    project = f"stepserve{ports['REDIS_PORT']}"
    compose(project, env, "up", "-d")
    apis = [f"http://127.0.0.1:{ports[k]}" for k in ("API1_PORT", "API2_PORT")]
    try:
        for url in apis:
            try:
                wait_ready(url, 300)
            except TimeoutError as exc:
                logs = compose(project, env, "logs", check=False).stdout[-3000:]
                raise TimeoutError(f"{exc}:\n{logs}") from None
        yield {"project": project, "env": env, "apis": apis,
               "redis": f"redis://127.0.0.1:{ports['REDIS_PORT']}/0"}
    finally:
        compose(project, env, "down", "-v", check=False)


def test_jobs_survive_a_killed_worker_and_a_redis_restart(topology):
    apis, project = topology["apis"], topology["project"]
    listener = Completions(topology["redis"])  # every `completed` announcement per job
    listener.start()
    assert listener.subscribed.wait(30)
    seen = listener.counts
    jobs = []
    try:
        for i in range(100):  # through both API containers in turn
            r = httpx.post(f"{apis[i % 2]}/v1/jobs", json={
                "prompt": PROMPT, "seed": i, "num_inference_steps": 8,
                "response_format": "url"}, timeout=30)
            assert r.status_code == 202, r.text
            jobs.append(r.json()["id"])
        while len(seen) < 10:
            time.sleep(0.1)
        killed = subprocess.run(["podman", "kill", "-s", "KILL", f"{project}_worker-1_1"],
                                capture_output=True, text=True)
        assert killed.returncode == 0, killed.stderr
        views = {}
        deadline = time.monotonic() + 600
        while len(views) < len(jobs) and time.monotonic() < deadline:
            for i, job in enumerate(jobs):
                if job not in views:
                    v = httpx.get(f"{apis[(i + 1) % 2]}/v1/jobs/{job}", timeout=30).json()
                    if v["status"] in ("completed", "failed", "cancelled"):
                        views[job] = v
            time.sleep(0.5)
        time.sleep(1)
    finally:
        listener.stopping.set()
    assert [v["status"] for v in views.values()] == ["completed"] * 100
    # announcements carry the jobs' internal ids (not the public ones): 100, once each
    assert len(seen) == 100 and set(seen.values()) == {1}, seen
    for job in jobs[:10]:  # a url minted by one API fetches from the other
        url = views[job]["result"]["data"][0]["url"]
        path = url[url.index("/v1/"):]
        for api in apis:
            assert httpx.get(f"{api}{path}", timeout=30).status_code == 200
    # Redis killed and started again: the append-only file brings every job back
    time.sleep(1.5)  # appendfsync everysec
    env = topology["env"]
    subprocess.run(["podman", "kill", "-s", "KILL", f"{project}_redis_1"], check=True,
                   capture_output=True)
    subprocess.run(["podman", "start", f"{project}_redis_1"], check=True,
                   capture_output=True, env=env)
    wait_ready(apis[0], 120)
    for i, job in enumerate(jobs):
        v = httpx.get(f"{apis[i % 2]}/v1/jobs/{job}", timeout=30).json()
        assert v["status"] == "completed", (job, v)
    after = httpx.post(f"{apis[1]}/v1/jobs", json={"prompt": PROMPT, "seed": 1000},
                       timeout=30).json()["id"]
    for _ in range(600):
        if httpx.get(f"{apis[0]}/v1/jobs/{after}", timeout=30).json()["status"] == "completed":
            break
        time.sleep(0.2)
    else:
        raise AssertionError("a job after the Redis restart did not complete")
