-- Shared by the rollout scripts. The status names and sets are filled in from core/models.py
-- (scripts.py); no script decides whether a rollout is retried: core/policy.py does, and passes
-- the decision in. KEYS[1..#STATUSES] are the status index zsets, in
-- STATUSES order; each script's own keys follow from KEYS[#STATUSES + 1].
-- The scripts read each hash once (one HMGET) and write it once (one HSET with every field):
-- Redis runs every command of a script on its single thread, so each one saved is server CPU.
local STATUSES = {__STATUSES__}
local TERMINAL = {__TERMINAL__}
local OPEN = {__OPEN__}
local STATUS_INDEX = {}
for i, name in ipairs(STATUSES) do
  STATUS_INDEX[name] = KEYS[i]
end
local K = #STATUSES

-- Move a rollout between status indexes (`score`: its enqueue time). The caller sets the
-- status field itself, in the HSET it makes anyway.
local function move_status(rollout_id, from, to, score)
  if from and STATUS_INDEX[from] then
    redis.call('ZREM', STATUS_INDEX[from], rollout_id)
  end
  redis.call('ZADD', STATUS_INDEX[to], score, rollout_id)
end

-- A rollout that reached a final status expires `ttl` seconds later, with its `n` attempts and
-- their traces, so a long run holds bounded memory. `ttl` '' or '0': kept forever. The index
-- zsets keep the id; readers skip ids whose record is gone and retention prunes them.
local function expire_rollout(rollout_key, attempt_prefix, ttl, n)
  ttl = tonumber(ttl)
  if not ttl or ttl <= 0 then return end
  redis.call('EXPIRE', rollout_key, ttl)
  for i = 1, tonumber(n or 0) do
    redis.call('EXPIRE', attempt_prefix .. i, ttl)
    redis.call('EXPIRE', attempt_prefix .. i .. '__SPANS_SUFFIX__', ttl)
  end
end
