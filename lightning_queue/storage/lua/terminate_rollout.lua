-- End a rollout that has not finished yet (cancel, or fail one that could not be published).
-- KEYS[K+1] rollout hash, KEYS[K+2] events channel, KEYS[K+3] heartbeat index
-- ARGV[1] rollout_id, ARGV[2] terminal status, ARGV[3] now, ARGV[4] error JSON or '',
-- ARGV[5] TTL of a finished rollout in seconds or '' (none), ARGV[6] attempt key prefix,
-- ARGV[7] the metric series caps ("<snapshot versions> <variants>", see _final_metrics.lua)
-- An open attempt (preparing or running) is closed with the same status.
-- Returns the rollout's status afterwards, or 'missing'.
local rollout_key = KEYS[K + 1]
local r = redis.call('HMGET', rollout_key, 'status', 'attempt_count', 'enqueue_time')
local status = r[1]
if not status then
  return 'missing'
end
if TERMINAL[status] then
  return status
end
if ARGV[4] ~= '' then
  redis.call('HSET', rollout_key, 'status', ARGV[2], 'end_time', ARGV[3], 'error', ARGV[4])
else
  redis.call('HSET', rollout_key, 'status', ARGV[2], 'end_time', ARGV[3])
end
if OPEN[status] then
  -- Close the open attempt too; if its agent still finishes, finish_attempt records that outcome.
  redis.call('HSET', ARGV[6] .. r[2], 'status', ARGV[2], 'end_time', ARGV[3])
end
redis.call('ZREM', KEYS[K + 3], ARGV[1])
move_status(ARGV[1], status, ARGV[2], r[3])
record_final_metrics(rollout_key, ARGV[1], ARGV[2], ARGV[7], tally_experiment(rollout_key, ARGV[1], ARGV[2]))
record_finished(rollout_key, ARGV[1], ARGV[2], ARGV[5])
expire_rollout(rollout_key, ARGV[6], ARGV[5], r[2])
redis.call('PUBLISH', KEYS[K + 2], ARGV[1])
return ARGV[2]
