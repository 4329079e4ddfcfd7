-- Move a pointer back to the target it had before its last move, atomically; a protected pointer
-- moves only when forced.
-- KEYS[1] pointers hash, KEYS[2] sequence, KEYS[3] snapshot events channel, KEYS[4] pointer protection hash
-- ARGV[1] pointer name, ARGV[2] now, ARGV[3] who (the actor), ARGV[4] history length, ARGV[5] history key prefix,
-- ARGV[6] snapshot key prefix, ARGV[7] '1' to move even a protected pointer, ARGV[8] the operation, ARGV[9] why
-- Returns {'ok', to, from} | {'nothing'} (no earlier target) | {'gone', id} (it was deleted)
--       | {'protected', protection JSON}.
local last = redis.call('LINDEX', ARGV[5] .. ARGV[1], 0)
if not last then return {'nothing'} end
local previous = cjson.decode(last)['from']
if not previous then return {'nothing'} end
if redis.call('EXISTS', ARGV[6] .. previous) == 0 then return {'gone', previous} end
local protection = refused_by_protection(KEYS[4], ARGV[1], ARGV[7])
if protection then return {'protected', protection} end
local from = move_pointer(KEYS[1], ARGV[5], ARGV[1], previous, ARGV[2], ARGV[3], ARGV[4], ARGV[8], ARGV[9])
announce(KEYS[2], KEYS[3], {op = 'pointer', pointers = {[ARGV[1]] = previous}})
return {'ok', previous, from or ''}
