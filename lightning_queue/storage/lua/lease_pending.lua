-- The reaper's read: take the due head of the pending index, atomically.
-- Entries whose rollout no longer waits for a worker (claimed, finished, or its record gone) are
-- dropped; each other entry taken is leased (its score moved to ARGV[3]), so concurrent reapers
-- take distinct entries and one that dies after this leaves them to come due again.
-- KEYS[1] pending index zset, KEYS[2] retry schedule zset
-- ARGV[1] now, ARGV[2] most entries to take, ARGV[3] lease end, ARGV[4] rollout key prefix
-- Returns a flat list {rollout_id, status, queue, enqueue_time, missing ('' or when first found
-- missing), resends ('' or a count), when its retry is due if it waits in the schedule else '', ...}.
local WAITING = {__WAITING__}
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
local out = {}
for _, rid in ipairs(due) do
  local r = redis.call('HMGET', ARGV[4] .. rid, 'status', 'queue', 'enqueue_time', 'missing', 'resends')
  if r[1] and WAITING[r[1]] then
    redis.call('ZADD', KEYS[1], ARGV[3], rid)
    local due = redis.call('ZSCORE', KEYS[2], rid) or ''
    for _, v in ipairs({rid, r[1], r[2] or '', r[3] or '', r[4] or '', r[5] or '', due}) do
      table.insert(out, v)
    end
  else
    redis.call('ZREM', KEYS[1], rid)
  end
end
return out
