-- Mark a pointer protected (or not), atomically with the check that it exists.
-- KEYS[1] pointers hash, KEYS[2] pointer protection hash
-- ARGV[1] pointer name, ARGV[2] protection JSON (reason, by, time), or '' to unprotect
-- Returns {'ok', previous protection JSON or ''} | {'missing'} (no such pointer, nothing protected).
local previous = redis.call('HGET', KEYS[2], ARGV[1]) or ''
if ARGV[2] == '' then
  redis.call('HDEL', KEYS[2], ARGV[1])
  return {'ok', previous}
end
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return {'missing'} end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return {'ok', previous}
