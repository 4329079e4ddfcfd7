-- Create the rollouts of a batch whose ids the caller chose, skipping those that exist, atomically.
-- KEYS[1] registry sequence
-- ARGV[i] JSON {id, key, score, fields: {field: string}, indexes: [zset key]} of one rollout
-- Returns {registry seq, then per rollout: {} when it was created, else its stored hash (HGETALL)}.
local out = {redis.call('GET', KEYS[1]) or '0'}
for i = 1, #ARGV do
  local r = cjson.decode(ARGV[i])
  local existing = redis.call('HGETALL', r.key)
  if #existing == 0 then
    local fields = {}
    for name, value in pairs(r.fields) do
      table.insert(fields, name)
      table.insert(fields, value)
    end
    redis.call('HSET', r.key, unpack(fields))
    for _, index in ipairs(r.indexes) do
      redis.call('ZADD', index, r.score, r.id)
    end
  end
  table.insert(out, existing)
end
return out
