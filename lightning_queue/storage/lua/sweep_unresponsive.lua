-- The watchdog: close every open attempt whose heartbeat deadline has passed, atomically.
-- Any number of workers may run it at once: each expired entry is taken (ZREM) by one of them.
-- KEYS[K+1] heartbeat index zset, KEYS[K+2] events channel
-- ARGV[1] now, ARGV[2] most entries to take, ARGV[3] rollout key prefix ("{p}:rollout:"),
-- ARGV[4] attempt key infix (":attempt:"), ARGV[5] error JSON, ARGV[6] TTL of a finished rollout or '',
-- ARGV[7] JSON of the default RolloutConfig (records store only what differs from it)
-- Each closed attempt becomes 'unresponsive'; its rollout goes to 'requeuing' when its config
-- retries 'unresponsive' and attempts remain (the caller then publishes it again), else 'failed'.
-- Returns a flat list {rollout_id, next status, sequence_id, ...} of the rollouts moved.
local due = redis.call('ZRANGEBYSCORE', KEYS[K + 1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
local moved = {}
for _, rid in ipairs(due) do
  redis.call('ZREM', KEYS[K + 1], rid)
  local rollout_key = ARGV[3] .. rid
  local r = redis.call('HMGET', rollout_key, 'status', 'attempt_count', 'enqueue_time', 'config')
  local status, n = r[1], r[2]
  if status == 'preparing' or status == 'running' then
    local attempt_prefix = rollout_key .. ARGV[4]
    redis.call('HSET', attempt_prefix .. n, 'status', 'unresponsive', 'end_time', ARGV[1], 'error', ARGV[5])
    local next_status = 'failed'
    if may_retry(r[4], ARGV[7], 'unresponsive', n) then
      next_status = 'requeuing'
    end
    if next_status == 'failed' then
      redis.call('HSET', rollout_key, 'status', next_status, 'error', ARGV[5], 'end_time', ARGV[1])
    else
      redis.call('HSET', rollout_key, 'status', next_status, 'error', ARGV[5])
    end
    move_status(rid, status, next_status, r[3])
    if next_status == 'failed' then
      expire_rollout(rollout_key, attempt_prefix, ARGV[6], n)
      redis.call('PUBLISH', KEYS[K + 2], rid)
    end
    table.insert(moved, rid)
    table.insert(moved, next_status)
    table.insert(moved, n)
  end
end
return moved
