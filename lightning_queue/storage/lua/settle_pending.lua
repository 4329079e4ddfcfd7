-- The reaper's write: apply what it decided for the entries it leased, atomically. An entry is
-- re-armed only if it still holds the lease (a claim took it out, or a requeue armed it anew,
-- meanwhile: then it is left as it is), and a record is touched only while its rollout waits
-- for a worker (an expired record is never recreated).
-- KEYS[1] pending index zset
-- ARGV[1] the lease end the entries were leased with, ARGV[2] rollout key prefix, ARGV[3] now,
-- then triples: rollout_id, next check time, what was found: 'present' (its message was found),
-- 'missing' (not found, for the first time: look again soon), 'resent' (its message was sent again)
-- Returns how many entries were re-armed.
local WAITING = {__WAITING__}
local lease = tonumber(ARGV[1])
local armed = 0
for i = 4, #ARGV, 3 do
  local rid, check, found = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local score = redis.call('ZSCORE', KEYS[1], rid)
  if score and tonumber(score) == lease then
    redis.call('ZADD', KEYS[1], check, rid)
    armed = armed + 1
  end
  local key = ARGV[2] .. rid
  if WAITING[redis.call('HGET', key, 'status')] then
    if found == 'missing' then
      redis.call('HSET', key, 'missing', ARGV[3])
    else
      redis.call('HDEL', key, 'missing')
      if found == 'resent' then
        redis.call('HINCRBY', key, 'resends', 1)
      end
    end
  end
end
return armed
