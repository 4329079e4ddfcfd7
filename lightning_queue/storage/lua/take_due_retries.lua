-- Take the retries whose backoff is over out of the retry schedule, atomically: concurrent
-- takers get distinct ones. The caller sends their messages; if it dies first, the reaper finds
-- them missing (their pending entries stay) and sends them.
-- KEYS[1] retry schedule zset
-- ARGV[1] now, ARGV[2] most entries to take
-- Returns the rollout ids taken.
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
if #due > 0 then
  redis.call('ZREM', KEYS[1], unpack(due))
end
return due
