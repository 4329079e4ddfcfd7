-- A worker takes a rollout: open a new attempt, atomically.
-- KEYS[K+1] rollout hash, KEYS[K+2] worker index zset, KEYS[K+3] events channel
-- ARGV[1] rollout_id, ARGV[2] worker_id, ARGV[3] now, ARGV[4] new attempt_id,
-- ARGV[5] attempts allowed after a lost one (0: a lost attempt is final),
-- ARGV[6] attempt key prefix ("{p}:rollout:{id}:attempt:"), ARGV[7] error JSON for a lost attempt,
-- ARGV[8] TTL of a finished rollout in seconds or '' (none)
-- Returns {'missing'} | {'finished', status} | {'lost', n} (the rollout failed: attempt n was
-- lost and no attempt is left) | {'claimed', n}.
local rollout_key = KEYS[K + 1]
local status = redis.call('HGET', rollout_key, 'status')
if not status then
  return {'missing'}
end
if TERMINAL[status] then
  return {'finished', status}
end
local n = tonumber(redis.call('HGET', rollout_key, 'attempt_count') or '0')
if status == 'preparing' or status == 'running' then
  -- The message came back while an attempt was open: that attempt's worker died.
  local open = ARGV[6] .. n
  redis.call('HSET', open, 'status', 'worker_lost', 'end_time', ARGV[3], 'error', ARGV[7])
  if n >= tonumber(ARGV[5]) then
    redis.call('HSET', rollout_key, 'end_time', ARGV[3], 'error', ARGV[7])
    set_status(rollout_key, ARGV[1], status, 'failed')
    expire_rollout(rollout_key, ARGV[6], ARGV[8])
    redis.call('PUBLISH', KEYS[K + 3], ARGV[1])
    return {'lost', n}
  end
end
n = n + 1
redis.call('HSET', ARGV[6] .. n, 'rollout_id', ARGV[1], 'sequence_id', n, 'attempt_id', ARGV[4],
  'worker_id', ARGV[2], 'status', 'preparing', 'start_time', ARGV[3])
redis.call('HSET', rollout_key, 'attempt_count', n)
if not redis.call('HGET', rollout_key, 'start_time') then
  redis.call('HSET', rollout_key, 'start_time', ARGV[3])
end
set_status(rollout_key, ARGV[1], status, 'preparing')
-- Scored by enqueue time like every other index, so queries order the same whatever the filter.
redis.call('ZADD', KEYS[K + 2], redis.call('HGET', rollout_key, 'enqueue_time'), ARGV[1])
return {'claimed', n}
