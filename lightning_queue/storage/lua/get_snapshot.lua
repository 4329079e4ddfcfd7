-- Resolve a reference (a pointer name or a resources_id) and read the snapshot, atomically.
-- KEYS[1] pointers hash, KEYS[2] sequence, KEYS[3] registry epoch
-- ARGV[1] reference, ARGV[2] version or '' (the current one), ARGV[3] snapshot key prefix
-- ("{p}:snapshot:"), ARGV[4] old-version infix (":v:")
-- Returns {'ok', resources_id, seq, pointer-or-'', epoch-or-'', field, value, ...} |
-- {'missing', id, pointer-or-''} | {'no_version', id, current_version}. seq and epoch are the registry's
-- sequence number and epoch at the read (a cache keeps the content as of that epoch).
local ref = ARGV[1]
local id = redis.call('HGET', KEYS[1], ref)
local pointer = ''
if id then pointer = ref else id = ref end
local key = ARGV[3] .. id
local current = redis.call('HGET', key, 'version')
if not current then
  return {'missing', id, pointer}
end
local fields
if ARGV[2] == '' or ARGV[2] == current then
  fields = redis.call('HGETALL', key)
else
  fields = redis.call('HGETALL', key .. ARGV[4] .. ARGV[2])
  if #fields == 0 then return {'no_version', id, current} end
  table.insert(fields, 'create_time')
  table.insert(fields, redis.call('HGET', key, 'create_time'))
end
local out = {'ok', id, redis.call('GET', KEYS[2]) or '0', pointer, redis.call('GET', KEYS[3]) or ''}
for _, v in ipairs(fields) do table.insert(out, v) end
return out
