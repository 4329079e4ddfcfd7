-- Traces and LLM usage (storage/traces.py), shared by the finish script (the worker's batch,
-- written with the attempt's outcome) and record_llm_call (one batch per proxy call).
-- A span batch goes to the attempt's spans list; the usage it records is added to the attempt
-- hash and to each rollup hash given (per snapshot version, per experiment variant).
local USAGE_FIELDS = {'attempts', 'llm_calls', 'input_tokens', 'output_tokens', 'cost_usd', 'unpriced_calls'}

-- Add `usage` (values in USAGE_FIELDS order) to hash `key`'s fields `{prefix}{field}`; the
-- attempt count only when `with_attempts`.
local function add_usage(key, prefix, usage, with_attempts)
  for i, name in ipairs(USAGE_FIELDS) do
    local v = tonumber(usage[i])
    if v and v ~= 0 and (with_attempts or name ~= 'attempts') then
      if name == 'cost_usd' then
        redis.call('HINCRBYFLOAT', key, prefix .. name, tostring(v))
      else
        redis.call('HINCRBY', key, prefix .. name, v)
      end
    end
  end
end

-- Record a trace batch of the attempt whose hash is `attempt_key` (`batch` '' or nil: none)
-- and `meta` (JSON or ''/nil: {"d": spans dropped, "u": usage values, "r": [[rollup key,
-- field prefix], ...]}), unless the rollout is gone: nothing may outlive its record. A batch
-- written after the rollout finished expires with it; one written before expires when the
-- rollout does (expire_rollout). Returns 1 when written, 0 when the rollout is gone.
local function record_trace(rollout_key, attempt_key, batch, meta)
  if (batch == nil or batch == '') and (meta == nil or meta == '') then return 1 end
  if redis.call('EXISTS', rollout_key) == 0 then return 0 end
  if batch ~= nil and batch ~= '' then
    local spans_key = attempt_key .. '__SPANS_SUFFIX__'
    redis.call('RPUSH', spans_key, batch)
    local ttl = redis.call('PTTL', rollout_key)
    if ttl > 0 then redis.call('PEXPIRE', spans_key, ttl) end
  end
  if meta ~= nil and meta ~= '' then
    local m = cjson.decode(meta)
    if m.d and tonumber(m.d) > 0 then redis.call('HINCRBY', attempt_key, 'spans_dropped', m.d) end
    if m.u then
      add_usage(attempt_key, '', m.u, false)
      for _, rollup in ipairs(m.r or {}) do
        add_usage(rollup[1], rollup[2], m.u, true)
      end
    end
  end
  return 1
end
