-- Read a pointer and the snapshot it names in one atomic step, so the pair is consistent.
-- KEYS[1] pointers hash
-- ARGV[1] pointer name, ARGV[2] snapshot key prefix ("{p}:snapshot:")
-- Returns {} when the pointer is unset, else {resources_id, field, value, field, value, ...}.
local rid = redis.call('HGET', KEYS[1], ARGV[1])
if not rid then
  return {}
end
local out = redis.call('HGETALL', ARGV[2] .. rid)
table.insert(out, 1, rid)
return out
