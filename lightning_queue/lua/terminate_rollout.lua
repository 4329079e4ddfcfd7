-- End a rollout that has not finished yet (cancel, or fail one that could not be published).
-- KEYS[K+1] rollout hash, KEYS[K+2] events channel
-- ARGV[1] rollout_id, ARGV[2] terminal status, ARGV[3] now, ARGV[4] error JSON or ''
-- Returns the rollout's status afterwards, or 'missing'.
local rollout_key = KEYS[K + 1]
local status = redis.call('HGET', rollout_key, 'status')
if not status then
  return 'missing'
end
if TERMINAL[status] then
  return status
end
redis.call('HSET', rollout_key, 'end_time', ARGV[3])
if ARGV[4] ~= '' then redis.call('HSET', rollout_key, 'error', ARGV[4]) end
set_status(rollout_key, ARGV[1], status, ARGV[2])
redis.call('PUBLISH', KEYS[K + 2], ARGV[1])
return ARGV[2]
