-- Point a named pointer at an existing snapshot, recording the move.
-- KEYS[1] pointers hash, KEYS[2] sequence, KEYS[3] snapshot events channel
-- ARGV[1] pointer name, ARGV[2] target (a resources_id or another pointer's name), ARGV[3] now,
-- ARGV[4] who moves it, ARGV[5] history length, ARGV[6] history key prefix, ARGV[7] snapshot key prefix,
-- ARGV[8] expected current target or '' (compare-and-set)
-- Returns {'ok', resources_id, previous-or-''} | {'missing', target} | {'name_taken'} | {'conflict', current-or-''}.
local target = redis.call('HGET', KEYS[1], ARGV[2]) or ARGV[2]
if redis.call('EXISTS', ARGV[7] .. target) == 0 then return {'missing', target} end
if redis.call('EXISTS', ARGV[7] .. ARGV[1]) == 1 then return {'name_taken'} end
if ARGV[8] ~= '' then
  local current = redis.call('HGET', KEYS[1], ARGV[1]) or ''
  if current ~= ARGV[8] then return {'conflict', current} end
end
local from = move_pointer(KEYS[1], ARGV[6], ARGV[1], target, ARGV[3], ARGV[4], ARGV[5])
announce(KEYS[2], KEYS[3], {op = 'pointer', pointers = {[ARGV[1]] = target}})
return {'ok', target, from or ''}
