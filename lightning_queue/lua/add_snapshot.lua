-- Store a new snapshot (version 1) and point "latest" at it, atomically.
-- KEYS[1] snapshot hash, KEYS[2] snapshots index, KEYS[3] pointers hash, KEYS[4] sequence
-- ARGV[1] resources_id, ARGV[2] payload, ARGV[3] now
-- Returns 1, or 0 when the id is taken (nothing is written then).
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
local seq = redis.call('INCR', KEYS[4])
redis.call('HSET', KEYS[1], 'resources', ARGV[2], 'version', 1, 'create_time', ARGV[3], 'update_time', ARGV[3])
redis.call('ZADD', KEYS[2], seq, ARGV[1])
redis.call('HSET', KEYS[3], 'latest', ARGV[1])
return 1
