"""Fault test of the scaled-out roles: jobs through `stepserve api` and workers over a
real Redis while workers are killed (-9) mid-job, and optionally Redis itself.
Every accepted job must complete, and exactly once.

    stepserve bench faults --jobs 200 --kills 2 --json docs/faults.json
    stepserve bench faults --jobs 100 --kills 1 --redis-kills 1

"Duplicated" counts completion announcements beyond the first per job, heard on
Redis pub/sub by a listener of this script; "re-run" counts jobs a second worker
started after the first was killed (expected: that is the recovery).
"""

from __future__ import annotations

import argparse
import collections
import json
import threading
import time
from pathlib import Path

import httpx
import redis

from stepserve.server.redis import keys

from .cluster import Cluster
from .redis_server import RedisServer

PROMPT = "a large green square in the center on a black background"
FINAL = ("completed", "failed", "cancelled")


class Completions(threading.Thread):
    """Counts `completed` announcements per job (psubscribe), reconnecting after a
    Redis restart."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url, self.counts = url, collections.Counter()
        self.stopping = threading.Event()
        self.subscribed = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                pubsub = redis.Redis.from_url(self.url, socket_connect_timeout=1).pubsub()
                pubsub.psubscribe(keys.events("*"))
                self.subscribed.set()
                while not self.stopping.is_set():
                    msg = pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5)
                    if msg and json.loads(msg["data"]).get("type") == "completed":
                        self.counts[msg["channel"].decode().rsplit(":", 1)[-1]] += 1
            except redis.RedisError:
                time.sleep(0.2)


def statuses(client: redis.Redis, ids: list[str]) -> list[tuple[str, str, int]]:
    """(status, worker, runs) of each job, read straight from Redis."""
    pipe = client.pipeline(transaction=False)
    for i in ids:
        pipe.hmget(keys.job(i), "status", "worker", "runs")
    return [(s.decode() if s else "missing", w.decode() if w else "", int(r or 0))
            for s, w, r in pipe.execute()]


def submit(url: str, jobs: int, steps: int, n: int) -> list[str]:
    ids = []
    with httpx.Client(timeout=60) as c:
        for i in range(jobs):
            r = c.post(f"{url}/v1/jobs", json={"prompt": PROMPT, "seed": i, "n": n,
                                               "num_inference_steps": steps})
            r.raise_for_status()
            ids.append(r.json()["id"])
    return ids


def run(args: argparse.Namespace) -> dict:
    worker_args = ("--threads", str(args.threads), "--visibility-timeout-s",
                   str(args.visibility), "--max-queue", str(args.worker_queue),
                   "--warmup-batch-sizes", "1")
    started = time.perf_counter()
    with RedisServer(fsync="always") as rs, Cluster(
            rs.url, worker_args, ("--max-queue", str(4 * args.jobs))) as cl:
        listener = Completions(rs.url)
        listener.start()
        listener.subscribed.wait(10)
        for _ in range(args.workers):
            cl.add_worker()
        cl.start_api()
        job_ids = submit(cl.url, args.jobs, args.steps, args.n)
        ids = [j.replace("job-", "img-", 1) for j in job_ids]  # the workers' request ids
        client = redis.Redis.from_url(rs.url, socket_connect_timeout=1)
        events = _drive(args, rs, cl, client, ids)
        final = _wait_final(client, ids, args.timeout)
        errors = _errors(client, ids)
        wall = time.perf_counter() - started
        served = _check_through_api(cl.url, job_ids, args.n)
        listener.stopping.set()
    counts = collections.Counter(s for s, _, _ in final)
    duplicated = sum(max(0, listener.counts[i] - 1) for i in ids)
    return {
        "jobs": args.jobs, "steps": args.steps, "images_per_job": args.n,
        "worker_kills": sum(e["what"] == "worker" for e in events),
        "redis_kills": sum(e["what"] == "redis" for e in events),
        "jobs_running_on_killed_workers": sum(e.get("running", 0) for e in events),
        "completed": counts["completed"], "failed": counts["failed"],
        "lost": args.jobs - counts["completed"] - counts["failed"] - counts["cancelled"],
        "duplicated": duplicated,
        "announced_once": sum(listener.counts[i] == 1 for i in ids),
        "rerun_jobs": sum(r > 1 for _, _, r in final),
        "served_by_api": served["ok"], "api_views": dict(served),
        "wall_s": round(wall, 1), "events": events,
        "errors": dict(errors),
    }


def _drive(args, rs: RedisServer, cl: Cluster, client: redis.Redis, ids: list[str]
           ) -> list[dict]:
    """Kill workers (and Redis) at evenly spaced points of progress, each while it is
    running a job (at the latest once no job waits to be taken); a replacement worker
    starts after each kill."""
    plan = ["worker"] * args.kills + ["redis"] * args.redis_kills
    marks = [len(ids) * (k + 1) / (len(plan) + 1) for k in range(len(plan))]
    events: list[dict] = []
    deadline = time.monotonic() + args.timeout
    while plan and time.monotonic() < deadline:
        time.sleep(0.1)
        try:
            now = statuses(client, ids)
        except redis.RedisError:
            continue
        done = sum(s in FINAL for s, _, _ in now)
        queued = sum(s == "queued" for s, _, _ in now)
        kills = sum(e["what"] != "missed" for e in events)
        if done < marks[kills] and queued:  # not yet; but at the latest once all are taken
            continue
        if plan[0] == "redis":
            rs.kill()
            time.sleep(args.redis_down_s)
            rs.start()
            events.append({"what": "redis", "at_done": done, "down_s": args.redis_down_s})
            plan.pop(0)
            continue
        running = collections.Counter(w for s, w, _ in now if s == "running")
        victim = next((p for p in cl.workers if p.poll() is None
                       and running[cl.consumer(p)] > 0), None)
        if victim is None:
            continue  # wait until a live worker is mid-job
        victim.kill()
        victim.wait()
        cl.add_worker()
        # what it held at the moment it died (its batch may have ended just before)
        held = sum(s == "running" and w == cl.consumer(victim)
                   for s, w, _ in statuses(client, ids))
        if not held:
            events.append({"what": "missed", "at_done": done})  # try another kill
            continue
        events.append({"what": "worker", "at_done": done, "running": held})
        plan.pop(0)
    return events


def _wait_final(client: redis.Redis, ids: list[str], timeout: float
                ) -> list[tuple[str, str, int]]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            now = statuses(client, ids)
        except redis.RedisError:
            time.sleep(0.2)
            continue
        if all(s in FINAL for s, _, _ in now) or time.monotonic() > deadline:
            return now
        time.sleep(0.2)


def _errors(client: redis.Redis, ids: list[str]) -> collections.Counter:
    """Failed jobs by error message."""
    pipe = client.pipeline(transaction=False)
    for i in ids:
        pipe.hget(keys.job(i), "error")
    return collections.Counter(json.loads(e)["message"] for e in pipe.execute() if e)


def _check_through_api(url: str, job_ids: list[str], n: int) -> collections.Counter:
    """What GET /v1/jobs/{id} says of each job ("ok": completed with all its images)."""
    seen: collections.Counter = collections.Counter()
    with httpx.Client(timeout=60) as c:
        for j in job_ids:
            view = c.get(f"{url}/v1/jobs/{j}").json()
            if view.get("status") == "completed" and len(view["result"]["data"]) == n:
                seen["ok"] += 1
            else:
                seen[json.dumps({k: view.get(k) for k in ("status", "error")})] += 1
    return seen


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="stepserve bench faults", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=200)
    p.add_argument("--kills", type=int, default=2, help="workers killed with SIGKILL")
    p.add_argument("--redis-kills", type=int, default=0,
                   help="times Redis itself is killed (-9) and restarted from its AOF")
    p.add_argument("--redis-down-s", type=float, default=2.0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--n", type=int, default=1, help="images per job")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--worker-queue", type=int, default=16,
                   help="jobs a worker holds at once (its --max-queue)")
    p.add_argument("--visibility", type=float, default=3.0,
                   help="seconds before a dead worker's jobs are reclaimed")
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    result = run(args)
    cols = ["jobs", "worker_kills", "redis_kills", "jobs_running_on_killed_workers",
            "completed", "failed", "lost", "duplicated", "rerun_jobs", "served_by_api",
            "wall_s"]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    print("| " + " | ".join(str(result[c]) for c in cols) + " |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
