"""Lua scripts that make a job's start and end atomic in Redis.

A job can be delivered twice: a worker that was only slow (not dead) can have its
entry reclaimed and run elsewhere too. Checking the status and writing it in one
script means exactly one of them stores the result and announces it; the other
only acknowledges the entry. (Plain commands would leave a window between the
check and the write.)
"""

from __future__ import annotations

# KEYS: job hash, stream. ARGV: group, entry, consumer.
# Returns "ended" (already final: acknowledged), "cancelled" or "run".
START = """
local st = redis.call('HGET', KEYS[1], 'status')
if st == 'completed' or st == 'failed' or st == 'cancelled' then
  redis.call('XACK', KEYS[2], ARGV[1], ARGV[2])
  return 'ended'
end
if redis.call('HGET', KEYS[1], 'cancelled') == '1' then return 'cancelled' end
redis.call('HSET', KEYS[1], 'status', 'running', 'worker', ARGV[3])
redis.call('HINCRBY', KEYS[1], 'runs', 1)
return 'run'
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
redis.call('HSET', KEYS[1], 'status', ARGV[3], 'ended_at', ARGV[4])
if ARGV[5] ~= '' then redis.call('HSET', KEYS[1], 'error', ARGV[5]) end
redis.call('EXPIRE', KEYS[1], ARGV[7])
redis.call('PUBLISH', KEYS[4], ARGV[6])
redis.call('XACK', KEYS[3], ARGV[1], ARGV[2])
return 1
"""
