-- Conclude an experiment in one atomic step: move a pointer (promotion, or a canary's
-- rollback) and stop the experiment, so no reader ever sees the pointer moved while the
-- experiment still routes traffic, or the experiment stopped with the pointer unmoved.
-- Builds on _registry_prelude (move_pointer, announce): the move is recorded in the
-- pointer's history like any other.
-- A protected pointer moves only when forced (checked here, before anything is written).
-- KEYS[1] experiment hash, KEYS[2] pointers hash, KEYS[3] sequence, KEYS[4] snapshot events channel,
-- KEYS[5] pointer protection hash
-- ARGV[1] pointer name ('' = stop only, move nothing), ARGV[2] target (id or pointer), ARGV[3] now,
-- ARGV[4] who moves it (pointer history "by", the actor), ARGV[5] history length, ARGV[6] history key prefix,
-- ARGV[7] snapshot key prefix, ARGV[8] expected current target of the pointer or '' (compare-and-set),
-- ARGV[9] stop reason, ARGV[10] winner variant or '', ARGV[11] allowed statuses, comma-separated,
-- ARGV[12] '1' to move even a protected pointer, ARGV[13] the operation (pointer history "op")
-- ARGV[2] may name another pointer: its current target is taken, as set_pointer does.
-- Returns {'ok', previous-target-or-'', target} | {'missing'} | {'status', current} | {'concluded', reason}
--       | {'no_target', target} | {'name_taken'} | {'conflict', current-or-''} | {'protected', protection JSON}.
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {'missing'} end
if redis.call('HGET', KEYS[1], 'concluded') == '1' then
  return {'concluded', redis.call('HGET', KEYS[1], 'stop_reason') or ''}
end
if not string.find(',' .. ARGV[11] .. ',', ',' .. status .. ',', 1, true) then return {'status', status} end
local from = ''
local target = ''
if ARGV[1] ~= '' then
  target = redis.call('HGET', KEYS[2], ARGV[2]) or ARGV[2]
  if redis.call('EXISTS', ARGV[7] .. target) == 0 then return {'no_target', target} end
  if redis.call('EXISTS', ARGV[7] .. ARGV[1]) == 1 then return {'name_taken'} end
  if ARGV[8] ~= '' then
    local current = redis.call('HGET', KEYS[2], ARGV[1]) or ''
    if current ~= ARGV[8] then return {'conflict', current} end
  end
  local protection = refused_by_protection(KEYS[5], ARGV[1], ARGV[12])
  if protection then return {'protected', protection} end
  from = move_pointer(KEYS[2], ARGV[6], ARGV[1], target, ARGV[3], ARGV[4], ARGV[5], ARGV[13], ARGV[9]) or ''
  announce(KEYS[3], KEYS[4], {op = 'pointer', pointers = {[ARGV[1]] = target}})
end
redis.call('HSET', KEYS[1], 'status', 'stopped', 'stop_reason', ARGV[9], 'winner', ARGV[10], 'concluded', '1')
if status ~= 'stopped' then redis.call('HSET', KEYS[1], 'stop_time', ARGV[3]) end
redis.call('HINCRBY', KEYS[1], 'revision', 1)
return {'ok', from, target}
