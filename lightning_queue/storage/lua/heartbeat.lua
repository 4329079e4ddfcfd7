-- An attempt's worker is alive: push its heartbeat deadline forward.
-- KEYS[1] rollout hash, KEYS[2] heartbeat index zset
-- ARGV[1] rollout_id, ARGV[2] sequence_id, ARGV[3] new deadline
-- Returns 1, or 0 when the attempt is no longer the rollout's open one (finished, cancelled,
-- or declared unresponsive or lost): then the index is left alone and the caller stops beating.
local OPEN = {__OPEN__}
local r = redis.call('HMGET', KEYS[1], 'status', 'attempt_count')
if not OPEN[r[1]] or r[2] ~= ARGV[2] then
  return 0
end
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
return 1
