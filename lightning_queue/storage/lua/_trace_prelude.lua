-- Traces and LLM usage (storage/traces.py), shared by the finish script (the worker's batch,
-- written with the attempt's outcome) and record_llm_call (one batch per proxy call).
-- A span batch goes to the attempt's spans list (a root span alone: to the attempt hash); the usage it records is added to the attempt
-- hash and to each rollup hash given (per snapshot version, per experiment variant).
local USAGE_FIELDS = {'attempts', 'llm_calls', 'input_tokens', 'output_tokens', 'cost_usd', 'unpriced_calls'}
local FINISHED = {__TERMINAL__}

-- Add `usage` (values in USAGE_FIELDS order) to hash `key`'s fields `{prefix}{field}`; the
-- attempt count only when `with_attempts`.
local function add_usage(key, prefix, usage, with_attempts)
  for i, name in ipairs(USAGE_FIELDS) do
    local v = tonumber(usage[i])
    if v and v ~= 0 and (with_attempts or name ~= 'attempts') then
      if name == 'cost_usd' then
        redis.call('HINCRBYFLOAT', key, prefix .. name, usage[i])
      else
        redis.call('HINCRBY', key, prefix .. name, v)
      end
    end
  end
end

-- Record a trace write of the attempt whose hash is `attempt_key`, its rollout being in `status`
-- (nil: the rollout is gone, and nothing may outlive its record: nothing is written). `args`
-- (from index `i`, as TraceWrite.args gives them): the span batch ('' none), the spans dropped,
-- the usage values (space-separated, '' none), then pairs of rollup key and field prefix. A
-- batch written after the rollout finished expires with it; one written before expires when the
-- rollout does (expire_rollout). Returns 1 when written, 0 when the rollout is gone.
local function record_trace(rollout_key, attempt_key, status, args, i)
  local batch, dropped, usage = args[i] or '', tonumber(args[i + 1] or '0') or 0, args[i + 2] or ''
  if batch == '' and dropped == 0 and usage == '' then return 1 end
  if not status then return 0 end
  if string.sub(batch, 1, 1) == 'r' then
    -- The root span alone, as attempt-hash fields ("r" then lines field, value: compact_root in
    -- storage/traces.py); the hash already expires with the rollout.
    local fields = {}
    for line in string.gmatch(string.sub(batch, 2), '[^\n]+') do table.insert(fields, line) end
    redis.call('HSET', attempt_key, unpack(fields))
  elseif batch ~= '' then
    local spans_key = attempt_key .. '__SPANS_SUFFIX__'
    redis.call('RPUSH', spans_key, batch)
    if FINISHED[status] then
      local ttl = redis.call('PTTL', rollout_key)
      if ttl > 0 then redis.call('PEXPIRE', spans_key, ttl) end
    end
  end
  if dropped > 0 then redis.call('HINCRBY', attempt_key, 'spans_dropped', dropped) end
  if usage ~= '' then
    local values = {}
    for v in string.gmatch(usage, '%S+') do table.insert(values, v) end
    add_usage(attempt_key, '', values, false)
    for j = i + 3, #args - 1, 2 do
      add_usage(args[j], args[j + 1], values, true)
    end
  end
  return 1
end
