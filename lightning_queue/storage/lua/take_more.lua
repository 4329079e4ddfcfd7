-- Used by lightning_queue/broker/transport.py (the worker's Redis transport), not by the store.
-- Record the message a BRPOP just returned (tag ARGV[3], record ARGV[4]; none when ARGV[3] is "") in
-- kombu's unacked index KEYS[2] (score ARGV[2]) and hash KEYS[3], remove the acked tags ARGV[5..],
-- then pop up to ARGV[1] more messages off the list KEYS[1] and record each the same way
-- ([message, exchange, routing key], as kombu's QoS.append writes it). Returns {tag, raw, tag, raw,
-- ...}; tag "" for a message that is not kombu's envelope (left unrecorded: the worker screens it out).
for i = 5, #ARGV do
  redis.call('ZREM', KEYS[2], ARGV[i])
  redis.call('HDEL', KEYS[3], ARGV[i])
end
if ARGV[3] ~= '' then
  redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
  redis.call('HSET', KEYS[3], ARGV[3], ARGV[4])
end
local out = {}
for _ = 1, tonumber(ARGV[1]) do
  local raw = redis.call('RPOP', KEYS[1])
  if not raw then break end
  local ok, m = pcall(cjson.decode, raw)
  local tag = ''
  if ok and type(m) == 'table' and type(m.properties) == 'table' and type(m.properties.delivery_tag) == 'string'
      and type(m.properties.delivery_info) == 'table' and type(m.properties.delivery_info.exchange) == 'string'
      and type(m.properties.delivery_info.routing_key) == 'string' then
    tag = m.properties.delivery_tag
    local info = m.properties.delivery_info
    redis.call('ZADD', KEYS[2], ARGV[2], tag)
    redis.call('HSET', KEYS[3], tag, '[' .. raw .. ',' .. cjson.encode(info.exchange) .. ','
      .. cjson.encode(info.routing_key) .. ']')
  end
  out[#out + 1] = tag
  out[#out + 1] = raw
end
return out
