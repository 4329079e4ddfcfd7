-- Look for task messages in one part of the broker: a slice of a queue list, or a step of a scan
-- of the unacked hash (kombu's: delivery tag -> [message, exchange, routing key]). Read-only.
-- A message is known by its task id, the first "id" field of its JSON (Celery's headers); a
-- rollout's task id is its rollout id.
-- A list is read from its tail, where workers take messages: the oldest messages, those of the
-- rollouts whose entries come due first, are read first (the caller stops once all are found).
-- KEYS[1] the list or hash
-- ARGV[1] 'list' or 'hash', ARGV[2] how many elements the previous parts read from the list's tail,
-- or the scan cursor of the hash, ARGV[3] how many elements to read, ARGV[4..] the task ids looked for
-- Returns {where the next part starts ('' when this was the last part), the ids found...}.
local wanted = {}
for i = 4, #ARGV do
  wanted[ARGV[i]] = true
end
local out = {''}
local function look(message)
  local id = string.match(message, '"id":%s*"([^"]*)"')
  if id and wanted[id] then
    table.insert(out, id)
    wanted[id] = nil
  end
end
local count = tonumber(ARGV[3])
if ARGV[1] == 'list' then
  local done = tonumber(ARGV[2])
  local items = redis.call('LRANGE', KEYS[1], -(done + count), -(done + 1))
  for _, message in ipairs(items) do
    look(message)
  end
  if #items == count then
    out[1] = tostring(done + count)
  end
else
  local reply = redis.call('HSCAN', KEYS[1], ARGV[2], 'COUNT', count)
  local flat = reply[2]
  for i = 2, #flat, 2 do
    look(flat[i])
  end
  if reply[1] ~= '0' then
    out[1] = reply[1]
  end
end
return out
