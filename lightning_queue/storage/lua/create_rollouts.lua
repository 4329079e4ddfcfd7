-- Create the rollouts of a batch whose ids the caller chose, skipping those that exist, atomically.
-- KEYS[1] registry sequence, KEYS[2] registry epoch (needs _epoch_prelude), KEYS[3] pending index (the
-- reaper's: rollout -> when to look for its message)
-- ARGV[1] the epoch the writer knows ('' none yet), ARGV[2] the epoch it proposes if there is none,
-- ARGV[i > 2] JSON {id, key, score, check, fields: {field: string}, indexes: [zset key]} of one rollout
-- (score: its enqueue time, the score of every index; check: its score in the pending index)
-- Every index gets one ZADD for all the batch's new members (in chunks, under Lua's stack
-- limit on unpack), not one per rollout.
-- Returns {registry seq, registry epoch, then per rollout: {} when it was created, else its stored hash
-- (HGETALL)} | {'epoch', current-or-''} (Redis lost its data since the writer last looked: nothing written).
local epoch, current_epoch = establish_epoch(KEYS[2], ARGV[1], ARGV[2])
if not epoch then return {'epoch', current_epoch} end
local out = {redis.call('GET', KEYS[1]) or '0', epoch}
local members = {}  -- index key -> {score, id, score, id, ...}
local order = {}
for i = 3, #ARGV do
  local r = cjson.decode(ARGV[i])
  local existing = redis.call('HGETALL', r.key)
  if #existing == 0 then
    local fields = {}
    for name, value in pairs(r.fields) do
      table.insert(fields, name)
      table.insert(fields, value)
    end
    redis.call('HSET', r.key, unpack(fields))
    redis.call('ZADD', KEYS[3], r.check, r.id)
    for _, index in ipairs(r.indexes) do
      if not members[index] then
        members[index] = {}
        table.insert(order, index)
      end
      table.insert(members[index], r.score)
      table.insert(members[index], r.id)
    end
  end
  table.insert(out, existing)
end
local CHUNK = 2000  -- arguments per ZADD: 1,000 members
for _, index in ipairs(order) do
  local args = members[index]
  for first = 1, #args, CHUNK do
    redis.call('ZADD', index, unpack(args, first, math.min(first + CHUNK - 1, #args)))
  end
end
return out
