-- Schedule the retries of requeued rollouts: each waits its backoff in the retry schedule (not in
-- a message a worker holds), and its message is looked for a grace after it is due. Atomic.
-- KEYS[1] retry schedule zset, KEYS[2] pending index zset
-- ARGV[1] rollout key prefix, ARGV[2] grace (seconds), then pairs: rollout_id, due time
-- A rollout that no longer waits for a worker (claimed through another message, cancelled) is skipped.
-- Returns the ids scheduled.
local WAITING = {__WAITING__}
local out = {}
for i = 3, #ARGV, 2 do
  local rid, due = ARGV[i], ARGV[i + 1]
  if WAITING[redis.call('HGET', ARGV[1] .. rid, 'status')] then
    redis.call('ZADD', KEYS[1], due, rid)
    redis.call('ZADD', KEYS[2], tonumber(due) + tonumber(ARGV[2]), rid)
    table.insert(out, rid)
  end
end
return out
