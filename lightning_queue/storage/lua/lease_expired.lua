-- The unresponsive sweep's read: take the expired head of the heartbeat index, atomically.
-- Each entry taken is given a short lease (its deadline moved to ARGV[3]), so concurrent
-- sweeps take distinct entries; a sweep that dies after this leaves its entries to come due
-- again when the lease ends. A worker that beats meanwhile moves the deadline past the lease.
-- KEYS[1] heartbeat index zset
-- ARGV[1] now, ARGV[2] most entries to take, ARGV[3] lease end, ARGV[4] rollout key prefix
-- Returns a flat list {rollout_id, attempt_count or '', stored config or '', ...}.
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
local out = {}
for _, rid in ipairs(due) do
  redis.call('ZADD', KEYS[1], ARGV[3], rid)
  local r = redis.call('HMGET', ARGV[4] .. rid, 'attempt_count', 'config')
  table.insert(out, rid)
  table.insert(out, r[1] or '')
  table.insert(out, r[2] or '')
end
return out
