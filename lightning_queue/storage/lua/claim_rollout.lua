-- A worker takes a rollout: open a new attempt, atomically, and return the record.
-- KEYS[K+1] rollout hash, KEYS[K+2] worker index zset, KEYS[K+3] events channel,
-- KEYS[K+4] heartbeat index zset (rollout_id -> heartbeat deadline),
-- KEYS[K+5] (only when starting) index of the rollouts of the snapshot it starts with
-- ARGV[1] rollout_id, ARGV[2] worker_id, ARGV[3] now, ARGV[4] new attempt_id,
-- ARGV[5] attempt key prefix ("{p}:rollout:{id}:attempt:"), ARGV[6] error JSON for a lost attempt,
-- ARGV[7] TTL of a finished rollout in seconds or '' (none), ARGV[8] heartbeat deadline of the
-- new attempt (its first heartbeat: a short rollout never sends another),
-- ARGV[9] JSON of the default RolloutConfig (the record stores only what differs from it),
-- ARGV[10] '1' to start the attempt at once (running, not preparing) with the concrete snapshot
-- ARGV[13] (resources_id) version ARGV[14], which the worker resolved from what the task message
-- says: ARGV[11] the rollout's resources_id ('' none) and ARGV[12] its pinned version ('' when it
-- follows). When the record says otherwise, the attempt stays preparing and the caller resolves
-- the snapshot from the returned record (the record is authoritative).
-- Returns {'missing'} | {'finished', status} | {'duplicate', n} (attempt n is open and its
-- heartbeat fresh: this is a second delivery of a message still being run; nothing is written) |
-- {'lost', n} (the rollout failed: attempt n was lost and no attempt is left) |
-- {'claimed', n, started (1 running, 0 preparing), the record's fields (HGETALL) afterwards}.
local rollout_key = KEYS[K + 1]
local rid = ARGV[1]
local now = ARGV[3]
local r = redis.call('HMGET', rollout_key, 'status', 'attempt_count', 'enqueue_time', 'start_time', 'config',
  'resources_id', 'resources_version', 'resolve')
local status = r[1]
if not status then
  return {'missing'}
end
if TERMINAL[status] then
  return {'finished', status}
end
local n = tonumber(r[2] or '0')
local score = r[3]
if status == 'preparing' or status == 'running' then
  local deadline = redis.call('ZSCORE', KEYS[K + 4], rid)
  if deadline and tonumber(deadline) > tonumber(now) then
    -- The broker redelivered a message whose attempt is alive (its visibility timeout passed
    -- while the attempt ran): running it again would run the rollout twice.
    return {'duplicate', n}
  end
  -- The message came back and the open attempt's heartbeat expired: its worker died.
  redis.call('ZREM', KEYS[K + 4], rid)
  redis.call('HSET', ARGV[5] .. n, 'status', 'worker_lost', 'end_time', now, 'error', ARGV[6])
  if not may_retry(r[5], ARGV[9], 'worker_lost', n) then
    redis.call('HSET', rollout_key, 'status', 'failed', 'end_time', now, 'error', ARGV[6])
    move_status(rid, status, 'failed', score)
    expire_rollout(rollout_key, ARGV[5], ARGV[7], n)
    redis.call('PUBLISH', KEYS[K + 3], rid)
    return {'lost', n}
  end
end
n = n + 1
-- Start at once only if the snapshot the worker resolved is the one the record asks for.
local pinned = r[8] == 'pinned'
local want_version = pinned and (r[7] or '') or ''
local start = ARGV[10] == '1' and (r[6] or '') == ARGV[11] and want_version == ARGV[12]
local attempt = {'rollout_id', rid, 'sequence_id', n, 'attempt_id', ARGV[4], 'worker_id', ARGV[2],
  'start_time', now}
local next_status = 'preparing'
if start then
  next_status = 'running'
  for _, v in ipairs({'status', 'running', 'resources_id', ARGV[13], 'resources_version', ARGV[14]}) do
    table.insert(attempt, v)
  end
else
  table.insert(attempt, 'status')
  table.insert(attempt, 'preparing')
end
redis.call('HSET', ARGV[5] .. n, unpack(attempt))
if r[4] then
  redis.call('HSET', rollout_key, 'status', next_status, 'attempt_count', n)
else
  redis.call('HSET', rollout_key, 'status', next_status, 'attempt_count', n, 'start_time', now)
end
move_status(rid, status, next_status, score)
redis.call('ZADD', KEYS[K + 4], ARGV[8], rid)
-- Scored by enqueue time like every other index, so queries order the same whatever the filter.
redis.call('ZADD', KEYS[K + 2], score, rid)
if start then
  redis.call('ZADD', KEYS[K + 5], score, rid)
end
return {'claimed', n, start and 1 or 0, redis.call('HGETALL', rollout_key)}
