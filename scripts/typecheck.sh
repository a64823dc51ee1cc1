#!/usr/bin/env bash
# mypy over the stepserve package's contracts. pyproject maps the top-level folders
# (server/, engines/, models/, ...) into `stepserve` with package-dir, which mypy cannot
# read: check a throw-away link tree of that mapping instead (the files themselves).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
tree="$(mktemp -d)"
trap 'rm -rf "$tree"' EXIT
mkdir "$tree/stepserve"
for f in "$root"/stepserve/*; do ln -s "$f" "$tree/stepserve/"; done
for d in server engines models loadtests; do ln -s "$root/$d" "$tree/stepserve/$d"; done
cd "$tree"
exec mypy --config-file "$root/pyproject.toml" --cache-dir "$root/.mypy_cache" "$@" \
    -p stepserve.server.scheduler \
    -m stepserve.engines.base -m stepserve.engines.capabilities -m stepserve.engines.registry \
    -m stepserve.engines.flow_sampling -m stepserve.engines.torch_engine \
    -m stepserve.engines.diffusers_engine -m stepserve.engines.qsched_search \
    -m stepserve.models.sampling.batch -m stepserve.models.sampling.state \
    -m stepserve.models.sampling.paradigms -m stepserve.models.families.sampler \
    -m stepserve.models.caches.config -m stepserve.models.caches.ab_cache \
    -m stepserve.models.caches.block_cache -m stepserve.models.caches.first_blocks \
    -m stepserve.models.caches.deepcache \
    -m stepserve.server.runtime -m stepserve.server.generation -m stepserve.server.jobs \
    -m stepserve.server.errors -m stepserve.server.submission -m stepserve.server.job_store \
    -m stepserve.server.settings -m stepserve.server.redis.client \
    -m stepserve.server.redis.api_runtime
