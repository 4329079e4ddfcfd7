-- A worker's main process saw the pool process running this rollout die: let the redelivered
-- message claim it at once, instead of being dropped as a duplicate until the heartbeat expires.
-- KEYS[1] rollout hash, KEYS[2] heartbeat index zset
-- ARGV[1] rollout_id, ARGV[2] worker_id of the process that died, ARGV[3] attempt key prefix
-- Returns 1 when the open attempt was that worker's and its heartbeat was dropped, else 0.
local OPEN = {__OPEN__}
local r = redis.call('HMGET', KEYS[1], 'status', 'attempt_count')
if not OPEN[r[1]] then
  return 0
end
if redis.call('HGET', ARGV[3] .. r[2], 'worker_id') ~= ARGV[2] then
  return 0
end
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
