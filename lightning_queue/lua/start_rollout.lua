-- The snapshot is resolved: the attempt starts running with it.
-- KEYS[K+1] rollout hash, KEYS[K+2] attempt hash, KEYS[K+3] index of the snapshot's rollouts
-- ARGV[1] rollout_id, ARGV[2] sequence_id, ARGV[3] resources_id, ARGV[4] version
-- Returns 1, or 0 when the attempt is no longer the rollout's open one (cancelled, or
-- superseded after its worker was presumed lost): the caller must not run it.
local rollout_key = KEYS[K + 1]
local status = redis.call('HGET', rollout_key, 'status')
if status ~= 'preparing' or redis.call('HGET', rollout_key, 'attempt_count') ~= ARGV[2] then
  return 0
end
redis.call('HSET', KEYS[K + 2], 'status', 'running', 'resources_id', ARGV[3], 'resources_version', ARGV[4])
set_status(rollout_key, ARGV[1], status, 'running')
redis.call('ZADD', KEYS[K + 3], redis.call('HGET', rollout_key, 'enqueue_time'), ARGV[1])
return 1
