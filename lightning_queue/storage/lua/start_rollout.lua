-- The snapshot is resolved: the attempt starts running with it.
-- KEYS[K+1] rollout hash, KEYS[K+2] attempt hash, KEYS[K+3] index of the snapshot's rollouts,
-- KEYS[K+4] registry epoch
-- ARGV[1] rollout_id, ARGV[2] sequence_id, ARGV[3] resources_id, ARGV[4] version,
-- ARGV[5] (optional: without it the epoch is not checked) the registry epoch the worker read that
-- snapshot in
-- Returns 1, or 0 when the attempt is no longer the rollout's open one (cancelled, or
-- superseded after its worker was presumed lost): the caller must not run it; or {'epoch',
-- current-or-''} when the registry is no longer of that epoch (Redis lost its data: (id, version)
-- may hold other content now): nothing is written, the caller reads the snapshot again.
local rollout_key = KEYS[K + 1]
local r = redis.call('HMGET', rollout_key, 'status', 'attempt_count', 'enqueue_time')
if r[1] ~= 'preparing' or r[2] ~= ARGV[2] then
  return 0
end
if ARGV[5] then
  local epoch = redis.call('GET', KEYS[K + 4]) or ''
  if epoch ~= ARGV[5] then
    return {'epoch', epoch}
  end
end
redis.call('HSET', KEYS[K + 2], 'status', 'running', 'resources_id', ARGV[3], 'resources_version', ARGV[4])
-- The snapshot it runs with, on the record too ("{version}:{resources_id}", see store.py).
redis.call('HSET', rollout_key, 'status', 'running', 'ran', ARGV[4] .. ':' .. ARGV[3])
move_status(ARGV[1], 'preparing', 'running', r[3])
redis.call('ZADD', KEYS[K + 3], r[3], ARGV[1])
return 1
