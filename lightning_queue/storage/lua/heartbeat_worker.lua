-- A worker's main process beats for an attempt one of its pool processes runs: that process is
-- alive and not stopped, though its own heartbeat thread may not get to run (an agent holding the
-- GIL in a long C call). Push the deadline forward only if the rollout's open attempt is that worker's.
-- KEYS[1] rollout hash, KEYS[2] heartbeat index zset
-- ARGV[1] rollout_id, ARGV[2] worker_id, ARGV[3] attempt key prefix, ARGV[4] new deadline
-- Returns 1, or 0 when the rollout has no open attempt of that worker (nothing written).
local OPEN = {__OPEN__}
local r = redis.call('HMGET', KEYS[1], 'status', 'attempt_count')
if not OPEN[r[1]] then
  return 0
end
if redis.call('HGET', ARGV[3] .. r[2], 'worker_id') ~= ARGV[2] then
  return 0
end
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[1])
return 1
