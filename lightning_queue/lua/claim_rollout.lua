-- A worker takes a rollout: open a new attempt, atomically.
-- KEYS[K+1] rollout hash, KEYS[K+2] worker index zset, KEYS[K+3] events channel,
-- KEYS[K+4] heartbeat index zset (rollout_id -> heartbeat deadline)
-- ARGV[1] rollout_id, ARGV[2] worker_id, ARGV[3] now, ARGV[4] new attempt_id,
-- ARGV[5] attempts allowed after a lost one (0: a lost attempt is final),
-- ARGV[6] attempt key prefix ("{p}:rollout:{id}:attempt:"), ARGV[7] error JSON for a lost attempt,
-- ARGV[8] TTL of a finished rollout in seconds or '' (none), ARGV[9] heartbeat deadline of the
-- new attempt (its first heartbeat: a short rollout never sends another)
-- Returns {'missing'} | {'finished', status} | {'duplicate', n} (attempt n is open and its
-- heartbeat fresh: this is a second delivery of a message still being run; nothing is written) |
-- {'lost', n} (the rollout failed: attempt n was lost and no attempt is left) | {'claimed', n}.
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
  local deadline = redis.call('ZSCORE', KEYS[K + 4], ARGV[1])
  if deadline and tonumber(deadline) > tonumber(ARGV[3]) then
    -- The broker redelivered a message whose attempt is alive (its visibility timeout passed
    -- while the attempt ran): running it again would run the rollout twice.
    return {'duplicate', n}
  end
  -- The message came back and the open attempt's heartbeat expired: its worker died.
  redis.call('ZREM', KEYS[K + 4], ARGV[1])
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
redis.call('ZADD', KEYS[K + 4], ARGV[9], ARGV[1])
-- Scored by enqueue time like every other index, so queries order the same whatever the filter.
redis.call('ZADD', KEYS[K + 2], redis.call('HGET', rollout_key, 'enqueue_time'), ARGV[1])
return {'claimed', n}
