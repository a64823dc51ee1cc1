"""Lua scripts that make a job's start and end atomic in Redis.

A job can be delivered twice: a worker that was only slow (not dead) can have its
entry reclaimed and run elsewhere too. Checking the status and writing it in one
script means exactly one of them stores the result and announces it; the other
only acknowledges the entry. (Plain commands would leave a window between the
check and the write.)
"""

from __future__ import annotations

# KEYS: job hash, stream. ARGV: model, steps, created_at, job id, params JSON, stream
# length bound. The job's hash, its stream entry and the entry's id in the hash are
# written together or not at all; a retry after a lost reply does not queue it twice.
# Returns the entry id.
ENQUEUE = """
local done = redis.call('HGET', KEYS[1], 'entry')
if done then return done end
redis.call('HSET', KEYS[1], 'status', 'queued', 'model', ARGV[1], 'steps', ARGV[2],
           'created_at', ARGV[3], 'step', 0)
local entry = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[6], '*',
                         'id', ARGV[4], 'params', ARGV[5])
redis.call('HSET', KEYS[1], 'entry', entry)
return entry
"""

# KEYS: job hash, stream, events channel.
# ARGV: group, entry, consumer, most runs, ended_at, error JSON, failed event JSON, ttl s.
# Returns "ended" (already final: acknowledged), "cancelled", "crashed" (started
# `most runs` times already, its workers died each time: failed now) or "run".
START = """
local st = redis.call('HGET', KEYS[1], 'status')
if st == 'completed' or st == 'failed' or st == 'cancelled' then
  redis.call('XACK', KEYS[2], ARGV[1], ARGV[2])
  return 'ended'
end
if redis.call('HGET', KEYS[1], 'cancelled') == '1' then return 'cancelled' end
local runs = tonumber(redis.call('HGET', KEYS[1], 'runs') or '0')
if runs >= tonumber(ARGV[4]) then
  redis.call('HSET', KEYS[1], 'status', 'failed', 'ended_at', ARGV[5], 'error', ARGV[6])
  redis.call('EXPIRE', KEYS[1], ARGV[8])
  redis.call('PUBLISH', KEYS[3], ARGV[7])
  redis.call('XACK', KEYS[2], ARGV[1], ARGV[2])
  return 'crashed'
end
redis.call('HSET', KEYS[1], 'status', 'running', 'worker', ARGV[3])
redis.call('HINCRBY', KEYS[1], 'runs', 1)
return 'run'
"""

# KEYS: job hash. ARGV: consumer. A job this worker took but cannot run now goes back
# to `queued`, unless it has meanwhile ended or moved to another worker.
REQUEUE = """
if redis.call('HGET', KEYS[1], 'status') == 'running'
    and redis.call('HGET', KEYS[1], 'worker') == ARGV[1] then
  redis.call('HSET', KEYS[1], 'status', 'queued')
  redis.call('HINCRBY', KEYS[1], 'runs', -1)
end
return 0
"""

# KEYS: job hash, result, stream, events channel.
# ARGV: group, entry, status, ended_at, error JSON or '', event JSON, ttl s, result or ''.
# Returns 1 if this call ended the job, 0 if it had already ended (only acknowledged).
FINISH = """
local st = redis.call('HGET', KEYS[1], 'status')
if st == 'completed' or st == 'failed' or st == 'cancelled' then
  redis.call('XACK', KEYS[3], ARGV[1], ARGV[2])
  return 0
end
if ARGV[8] ~= '' then redis.call('SET', KEYS[2], ARGV[8], 'EX', ARGV[7]) end
redis.call('HSET', KEYS[1], 'status', ARGV[3], 'ended_at', ARGV[4], 'outcome', ARGV[6])
if ARGV[5] ~= '' then redis.call('HSET', KEYS[1], 'error', ARGV[5]) end
redis.call('EXPIRE', KEYS[1], ARGV[7])
redis.call('PUBLISH', KEYS[4], ARGV[6])
redis.call('XACK', KEYS[3], ARGV[1], ARGV[2])
return 1
"""
