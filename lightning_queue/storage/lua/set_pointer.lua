-- Point a named pointer at an existing snapshot, recording the move; a protected pointer moves only
-- when forced, checked here so no move slips between a check and the write.
-- KEYS[1] pointers hash, KEYS[2] sequence, KEYS[3] snapshot events channel, KEYS[4] pointer protection hash
-- ARGV[1] pointer name, ARGV[2] target (a resources_id or another pointer's name), ARGV[3] now,
-- ARGV[4] who moves it (the actor), ARGV[5] history length, ARGV[6] history key prefix, ARGV[7] snapshot key prefix,
-- ARGV[8] expected current target or '' (compare-and-set), ARGV[9] '1' to move even a protected pointer,
-- ARGV[10] the operation, ARGV[11] why ('' none)
-- Returns {'ok', resources_id, previous-or-''} | {'missing', target} | {'name_taken'} | {'conflict', current-or-''}
--       | {'protected', protection JSON}.
local target = redis.call('HGET', KEYS[1], ARGV[2]) or ARGV[2]
if redis.call('EXISTS', ARGV[7] .. target) == 0 then return {'missing', target} end
if redis.call('EXISTS', ARGV[7] .. ARGV[1]) == 1 then return {'name_taken'} end
if ARGV[8] ~= '' then
  local current = redis.call('HGET', KEYS[1], ARGV[1]) or ''
  if current ~= ARGV[8] then return {'conflict', current} end
end
local protection = refused_by_protection(KEYS[4], ARGV[1], ARGV[9])
if protection then return {'protected', protection} end
local from = move_pointer(KEYS[1], ARGV[6], ARGV[1], target, ARGV[3], ARGV[4], ARGV[5], ARGV[10], ARGV[11])
announce(KEYS[2], KEYS[3], {op = 'pointer', pointers = {[ARGV[1]] = target}})
return {'ok', target, from or ''}
