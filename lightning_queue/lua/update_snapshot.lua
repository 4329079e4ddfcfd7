-- Store a new version of an existing snapshot and point "latest" at it, atomically.
-- KEYS[1] snapshot hash, KEYS[2] snapshots index, KEYS[3] pointers hash, KEYS[4] sequence
-- ARGV[1] resources_id, ARGV[2] payload, ARGV[3] now, ARGV[4] expected version or ''
-- Returns {status, version, create_time}: status 1 written, 0 no such id, -1 version conflict
-- (version is then the current one and nothing is written).
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {0, 0, ''}
end
local current = tonumber(redis.call('HGET', KEYS[1], 'version'))
if ARGV[4] ~= '' and tonumber(ARGV[4]) ~= current then
  return {-1, current, ''}
end
local version = current + 1
local seq = redis.call('INCR', KEYS[4])
redis.call('HSET', KEYS[1], 'resources', ARGV[2], 'version', version, 'update_time', ARGV[3])
redis.call('ZADD', KEYS[2], seq, ARGV[1])
redis.call('HSET', KEYS[3], 'latest', ARGV[1])
return {1, version, redis.call('HGET', KEYS[1], 'create_time')}
