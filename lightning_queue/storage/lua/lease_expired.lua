-- The unresponsive sweep's read: take the expired head of the heartbeat index, atomically.
-- Each entry taken is given a short lease (its deadline moved to ARGV[3]), so concurrent
-- sweeps take distinct entries; a sweep that dies after this leaves its entries to come due
-- again when the lease ends. A worker that beats meanwhile moves the deadline past the lease.
-- Outages: attempts cannot beat while Redis is unreachable, so their deadlines pass during a long
-- outage although their workers are alive. The fleet's sweeps note when they run (Redis's clock, in
-- the watchdog hash): a pause longer than ARGV[5] seconds means no worker could sweep, i.e. Redis was
-- unreachable (stopped, restarting, paused) for about that long. Then nothing is declared dead for
-- ARGV[6] seconds (the watchdog's 'hold', which the claim honours too), so the workers still running
-- attempts beat first. A missing note (a fresh registry, or one that lost its data, deadlines and all)
-- holds nothing.
-- KEYS[1] heartbeat index zset, KEYS[2] watchdog hash
-- ARGV[1] now, ARGV[2] most entries to take, ARGV[3] lease end, ARGV[4] rollout key prefix,
-- ARGV[5] longest pause between sweeps that is not an outage, ARGV[6] hold after an outage (seconds)
-- Returns {'hold', seconds left, 1 if the hold started now else 0} | {'ok', rollout_id, attempt_count
-- or '', stored config or '', ...}.
local t = redis.call('TIME')
local clock = tonumber(t[1]) + tonumber(t[2]) / 1000000
local w = redis.call('HMGET', KEYS[2], 'last', 'hold')
redis.call('HSET', KEYS[2], 'last', string.format('%.6f', clock))
if w[1] and clock - tonumber(w[1]) > tonumber(ARGV[5]) then
  local hold = clock + tonumber(ARGV[6])
  redis.call('HSET', KEYS[2], 'hold', string.format('%.6f', hold))
  return {'hold', tostring(ARGV[6]), 1}
end
if w[2] and tonumber(w[2]) > clock then
  return {'hold', string.format('%.3f', tonumber(w[2]) - clock), 0}
end
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
local out = {'ok'}
for _, rid in ipairs(due) do
  redis.call('ZADD', KEYS[1], ARGV[3], rid)
  local r = redis.call('HMGET', ARGV[4] .. rid, 'attempt_count', 'config')
  table.insert(out, rid)
  table.insert(out, r[1] or '')
  table.insert(out, r[2] or '')
end
return out
