-- Shared by the rollout scripts. KEYS[1..#STATUSES] are the status index zsets, in
-- STATUSES order; each script's own keys follow from KEYS[#STATUSES + 1].
local STATUSES = {__STATUSES__}
local TERMINAL = {succeeded = true, failed = true, cancelled = true}
local STATUS_INDEX = {}
for i, name in ipairs(STATUSES) do
  STATUS_INDEX[name] = KEYS[i]
end
local K = #STATUSES

-- Move a rollout between status indexes and set its status field.
local function set_status(rollout_key, rollout_id, from, to)
  local score = redis.call('HGET', rollout_key, 'enqueue_time')
  if from and STATUS_INDEX[from] then
    redis.call('ZREM', STATUS_INDEX[from], rollout_id)
  end
  redis.call('ZADD', STATUS_INDEX[to], score, rollout_id)
  redis.call('HSET', rollout_key, 'status', to)
end

-- A rollout that reached a final status expires `ttl` seconds later, with every attempt, so a
-- long run holds bounded memory. `ttl` '' or '0': kept forever. The index zsets keep the id;
-- readers skip ids whose record is gone and retention prunes them.
local function expire_rollout(rollout_key, attempt_prefix, ttl)
  ttl = tonumber(ttl)
  if not ttl or ttl <= 0 then return end
  redis.call('EXPIRE', rollout_key, ttl)
  local n = tonumber(redis.call('HGET', rollout_key, 'attempt_count') or '0')
  for i = 1, n do
    redis.call('EXPIRE', attempt_prefix .. i, ttl)
  end
end
