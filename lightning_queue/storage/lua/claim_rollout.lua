-- A worker takes a rollout: open a new attempt, atomically, and return the record.
-- KEYS[K+1] rollout hash, KEYS[K+2] worker index zset,
-- KEYS[K+3] heartbeat index zset (rollout_id -> heartbeat deadline of its open attempt),
-- KEYS[K+4] the watchdog hash (its 'hold': no attempt is presumed dead before that Redis time),
-- KEYS[K+5] pending index and KEYS[K+6] retry schedule (the claimed rollout leaves both: its message arrived),
-- KEYS[K+7] (only when starting) index of the rollouts of the snapshot it starts with,
-- KEYS[K+8] (only when starting) the registry epoch
-- ARGV[1] rollout_id, ARGV[2] worker_id, ARGV[3] now, ARGV[4] new attempt_id,
-- ARGV[5] attempt key prefix ("{p}:rollout:{id}:attempt:"), ARGV[6] heartbeat deadline of the new
-- attempt (its first heartbeat: a short rollout never sends another),
-- ARGV[7] '1' to start the attempt at once (running, not preparing) with the concrete snapshot
-- ARGV[13] the longest pause of the fleet's sweeps that is not an outage (see lease_expired.lua),
-- ARGV[10] (resources_id) version ARGV[11], which the worker resolved from what the task message
-- says: ARGV[8] the rollout's resources_id ('' none) and ARGV[9] its pinned version ('' when it
-- follows), and ARGV[12] the registry epoch the worker read that snapshot in. When the record says
-- otherwise, or the registry is no longer of that epoch (Redis lost its data: (id, version) may now
-- hold other content), the attempt stays preparing and the caller resolves the snapshot from the
-- returned record (the record is authoritative).
-- Returns {'missing'} | {'finished', status} | {'duplicate', n} (attempt n is open and its
-- heartbeat fresh: this is a second delivery of a message still being run; nothing is written) |
-- {'expired', n, config} (attempt n is open but its heartbeat expired: its worker died; nothing is
-- written: the caller closes it as worker_lost with the retry policy's decision, then claims again) |
-- {'held', n} (attempt n's heartbeat expired, but the watchdog holds off after an outage: its worker
-- may be alive and not have beaten again yet; nothing is written, the caller drops this delivery) |
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
if OPEN[status] then
  local deadline = redis.call('ZSCORE', KEYS[K + 3], rid)
  if deadline and tonumber(deadline) > tonumber(now) then
    -- The broker redelivered a message whose attempt is alive (its visibility timeout passed
    -- while the attempt ran): running it again would run the rollout twice.
    return {'duplicate', n}
  end
  -- Its heartbeat may have lapsed only because nobody could reach Redis: while the watchdog holds
  -- off after an outage, or before any sweep has noticed one (the last sweep is older than
  -- ARGV[13] seconds), the worker may be alive and about to beat again. (No deadline at all: its
  -- worker saw the process die and released it, release_lost.lua; it is lost for sure.)
  if deadline then
    local w = redis.call('HMGET', KEYS[K + 4], 'hold', 'last')
    local t = redis.call('TIME')
    local clock = tonumber(t[1]) + tonumber(t[2]) / 1000000
    if (w[1] and tonumber(w[1]) > clock) or (w[2] and clock - tonumber(w[2]) > tonumber(ARGV[13])) then
      return {'held', n}
    end
  end
  return {'expired', n, r[5] or ''}
end
n = n + 1
-- Start at once only if the snapshot the worker resolved is the one the record asks for.
local pinned = r[8] == 'pinned'
local want_version = pinned and (r[7] or '') or ''
local start = ARGV[7] == '1' and (r[6] or '') == ARGV[8] and want_version == ARGV[9]
  and (redis.call('GET', KEYS[K + 8]) or '') == ARGV[12]
-- The attempt's rollout id and number are its key's (store.py decode_attempt), not fields; its
-- start time is the record's when this claim starts the rollout (store.py get_attempts reads it there).
local attempt = {'attempt_id', ARGV[4], 'worker_id', ARGV[2]}
if r[4] then
  table.insert(attempt, 'start_time'); table.insert(attempt, now)
end
local next_status = 'preparing'
if start then
  next_status = 'running'
  for _, v in ipairs({'status', 'running', 'resources_id', ARGV[10], 'resources_version', ARGV[11]}) do
    table.insert(attempt, v)
  end
else
  table.insert(attempt, 'status')
  table.insert(attempt, 'preparing')
end
redis.call('HSET', ARGV[5] .. n, unpack(attempt))
local fields = {'status', next_status, 'attempt_count', n}
if not r[4] then
  table.insert(fields, 'start_time'); table.insert(fields, now)
end
if start then
  -- The snapshot it runs with, on the record too ("{version}:{resources_id}", see store.py).
  table.insert(fields, 'ran'); table.insert(fields, ARGV[11] .. ':' .. ARGV[10])
end
redis.call('HSET', rollout_key, unpack(fields))
move_status(rid, status, next_status, score)
redis.call('ZADD', KEYS[K + 3], ARGV[6], rid)
redis.call('ZREM', KEYS[K + 5], rid)
redis.call('ZREM', KEYS[K + 6], rid)
-- Scored by enqueue time like every other index, so queries order the same whatever the filter.
redis.call('ZADD', KEYS[K + 2], score, rid)
if start then
  redis.call('ZADD', KEYS[K + 7], score, rid)
end
return {'claimed', n, start and 1 or 0, redis.call('HGETALL', rollout_key)}
