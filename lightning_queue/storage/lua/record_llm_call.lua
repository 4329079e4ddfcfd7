-- Record one LLM call the proxy forwarded for an attempt: its span batch and usage (see
-- _trace_prelude), within the attempt's trace budget: past ARGV[3] bytes of proxy batches the
-- span is counted as dropped instead (the usage is always added).
-- KEYS[1] rollout hash, KEYS[2] attempt hash
-- ARGV[1] span batch, ARGV[2] meta JSON (usage and rollups), ARGV[3] trace budget in bytes
-- Returns 1 when recorded, 0 when the rollout is gone.
local batch = ARGV[1]
local meta = cjson.decode(ARGV[2])
local used = tonumber(redis.call('HGET', KEYS[2], 'proxy_bytes') or '0')
if used + #batch > tonumber(ARGV[3]) then
  batch = ''
  meta.d = 1
end
local written = record_trace(KEYS[1], KEYS[2], batch, cjson.encode(meta))
if written == 1 and batch ~= '' then redis.call('HINCRBY', KEYS[2], 'proxy_bytes', #batch) end
return written
