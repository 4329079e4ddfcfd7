-- Record one LLM call the proxy forwarded for an attempt: its span batch and usage (see
-- _trace_prelude), within the attempt's trace budget: past ARGV[1] bytes of proxy batches the
-- span is counted as dropped instead (the usage is always added).
-- KEYS[1] rollout hash, KEYS[2] attempt hash
-- ARGV[1] trace budget in bytes, then the trace write from ARGV[2] (see record_trace)
-- Returns 1 when recorded, 0 when the rollout is gone.
local status = redis.call('HGET', KEYS[1], 'status')
local used = tonumber(redis.call('HGET', KEYS[2], 'proxy_bytes') or '0')
local batch = ARGV[2]
if used + #batch > tonumber(ARGV[1]) then
  ARGV[2] = ''
  ARGV[3] = tostring((tonumber(ARGV[3]) or 0) + 1)
end
local written = record_trace(KEYS[1], KEYS[2], status, ARGV, 2)
if written == 1 and ARGV[2] ~= '' then redis.call('HINCRBY', KEYS[2], 'proxy_bytes', #batch) end
return written
