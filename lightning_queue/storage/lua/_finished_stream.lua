-- The finished-rollouts cursor, loaded by every script that moves a rollout to a final status
-- (after _rollout_prelude). In the same atomic step as the transition, and exactly once (a final
-- status is never left), the rollout enters:
--   {p}:rollouts:ended  zset    rollout_id -> end time (queries by end time)
--   {p}:finished        stream  one entry {id, status}; its entry id is the cursor readers resume from
-- The stream is trimmed approximately (MINID ~, whole macro nodes) to `ttl` seconds back from this
-- entry: an entry lives about as long as the record it names (expire_rollout). `ttl` '' or '0':
-- records are kept forever, and so is the stream. The keys are the rollout key's prefix plus the
-- suffixes of core/keys.py (spelled in by scripts.py).
local function record_finished(rollout_key, rid, status, ttl)
  local prefix = string.sub(rollout_key, 1, #rollout_key - #('__ROLLOUT_INFIX__' .. rid))
  local ended = redis.call('HGET', rollout_key, 'end_time')
  if ended then redis.call('ZADD', prefix .. '__ENDED_SUFFIX__', ended, rid) end
  local entry = redis.call('XADD', prefix .. '__FINISHED_SUFFIX__', '*', 'id', rid, 'status', status)
  ttl = tonumber(ttl)
  if ttl and ttl > 0 then
    local ms = tonumber(string.match(entry, '^(%d+)-'))
    -- pcall: MINID needs Redis 6.2; an older server keeps the stream whole rather than fail the transition.
    redis.pcall('XTRIM', prefix .. '__FINISHED_SUFFIX__', 'MINID', '~', string.format('%d', ms - ttl * 1000))
  end
end
