-- Shared by the registry scripts.

-- Point `name` at `to` (false: unset it) and record the move in the pointer's bounded history:
-- who (`by`, the actor), what operation (`op`) and why (`reason`, '' for none).
-- Returns the previous target, or false.
local function move_pointer(pointers_key, history_prefix, name, to, now, by, max_history, op, reason)
  local from = redis.call('HGET', pointers_key, name)
  if to then
    redis.call('HSET', pointers_key, name, to)
  else
    redis.call('HDEL', pointers_key, name)
  end
  local history = history_prefix .. name
  redis.call('LPUSH', history, cjson.encode({['from'] = from or false, to = to or false, time = tonumber(now), by = by,
    op = op or '', reason = reason or ''}))
  redis.call('LTRIM', history, 0, tonumber(max_history) - 1)
  return from
end

-- Tell every worker cache what changed, stamped with a fresh registry sequence number.
local function announce(seq_key, channel, event)
  event.seq = redis.call('INCR', seq_key)
  redis.call('PUBLISH', channel, cjson.encode(event))
  return event.seq
end

-- A protected pointer moves only when forced (the caller has checked a reason comes with the
-- force). Returns the protection (its JSON) when the move must be refused, else false.
local function refused_by_protection(protection_key, name, force)
  local protection = redis.call('HGET', protection_key, name)
  if protection and force ~= '1' then return protection end
  return false
end
