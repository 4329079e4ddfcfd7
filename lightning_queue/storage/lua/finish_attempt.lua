-- Record an attempt's outcome and move the rollout on, atomically.
-- KEYS[K+1] rollout hash, KEYS[K+2] attempt hash, KEYS[K+3] events channel, KEYS[K+4] heartbeat index,
-- KEYS[K+5] pending index (a requeued rollout enters it: the reaper looks for its retry's message at ARGV[11])
-- ARGV[1] rollout_id, ARGV[2] sequence_id, ARGV[3] attempt status, ARGV[4] now,
-- ARGV[5] error JSON or '', ARGV[6] result JSON or '', ARGV[7] next rollout status
-- (succeeded | failed | requeuing: the retry policy's decision, core/policy.py),
-- ARGV[8] TTL of a finished rollout in seconds or '' (none), ARGV[9] attempt key prefix
-- ("{p}:rollout:{id}:attempt:"), ARGV[10] '' when the attempt reports its own outcome, or a time
-- when it is closed from outside (the unresponsive sweep, a claim that found its worker dead):
-- then only if its heartbeat expired by that time, so an attempt that beat since is left alone.
-- ARGV[11] the time the reaper looks for the retry's message, should the rollout be requeued.
-- The result is stored once: on the rollout when the outcome is accepted (the attempt that
-- finished the rollout reads it from there), on the attempt only when the rollout was cancelled
-- while it ran (kept for inspection, the rollout keeps its status).
-- ARGV[12] the metric series caps ("<snapshot versions> <variants>", see _final_metrics.lua),
-- ARGV[13...] the attempt's trace (see record_trace in _trace_prelude: batch, spans dropped, usage,
-- rollups), recorded whatever the outcome, as long as the rollout exists.
-- Returns the rollout's status afterwards; 'stale' when the attempt is no longer the rollout's
-- current one or was already closed as lost, unresponsive or timed out (its outcome is refused:
-- nothing is written); 'alive' when closing from outside and the attempt beat since.
local rollout_key = KEYS[K + 1]
local rid = ARGV[1]
local r = redis.call('HMGET', rollout_key, 'attempt_count', 'status', 'enqueue_time')
local status = r[2]
record_trace(rollout_key, KEYS[K + 2], status, ARGV, 13)
local outside = ARGV[10] ~= ''
if outside then
  local deadline = redis.call('ZSCORE', KEYS[K + 4], rid)
  if r[1] ~= ARGV[2] or not OPEN[status] then
    -- Nothing open to close; an expired index entry left behind goes (a fresh one is another attempt's).
    if deadline and tonumber(deadline) <= tonumber(ARGV[10]) then redis.call('ZREM', KEYS[K + 4], rid) end
    return 'stale'
  end
  if deadline and tonumber(deadline) > tonumber(ARGV[10]) then
    return 'alive'
  end
elseif r[1] ~= ARGV[2] then
  return 'stale'
end
local CLOSED = {__CLOSED__}
if CLOSED[redis.call('HGET', KEYS[K + 2], 'status')] then
  return 'stale'
end
redis.call('ZREM', KEYS[K + 4], rid)
local attempt = {'status', ARGV[3]}
-- A root-only trace (record_trace) need not repeat the status the attempt records: query_spans reads it there.
if redis.call('HGET', KEYS[K + 2], 'root_status') == ARGV[3] then redis.call('HDEL', KEYS[K + 2], 'root_status') end
if ARGV[5] ~= '' then table.insert(attempt, 'error'); table.insert(attempt, ARGV[5]) end
if TERMINAL[status] then
  -- Cancelled while it ran: the outcome is kept on the attempt only, which expires with the rollout.
  if ARGV[6] ~= '' then table.insert(attempt, 'result'); table.insert(attempt, ARGV[6]) end
  table.insert(attempt, 'end_time'); table.insert(attempt, ARGV[4])
  redis.call('HSET', KEYS[K + 2], unpack(attempt))
  local ttl = redis.call('PTTL', rollout_key)
  if ttl > 0 then redis.call('PEXPIRE', KEYS[K + 2], ttl) end
  return status
end
local next_status = ARGV[7]
-- The attempt that finishes the rollout ends when the rollout does: its end time is stored once, on
-- the record (store.py get_attempts reads it there), as its result is.
if not TERMINAL[next_status] then
  table.insert(attempt, 'end_time'); table.insert(attempt, ARGV[4])
end
redis.call('HSET', KEYS[K + 2], unpack(attempt))
local fields = {'status', next_status}
if ARGV[5] ~= '' then table.insert(fields, 'error'); table.insert(fields, ARGV[5]) end
if TERMINAL[next_status] then
  table.insert(fields, 'end_time'); table.insert(fields, ARGV[4])
  if ARGV[6] ~= '' then table.insert(fields, 'result'); table.insert(fields, ARGV[6]) end
end
redis.call('HSET', rollout_key, unpack(fields))
-- An earlier attempt's error may be on the record; only a retried rollout can have one.
if next_status == 'succeeded' and tonumber(ARGV[2]) > 1 then redis.call('HDEL', rollout_key, 'error') end
move_status(rid, status, next_status, r[3])
if next_status == 'requeuing' then
  redis.call('ZADD', KEYS[K + 5], ARGV[11], rid)
end
if TERMINAL[next_status] then
  record_final_metrics(rollout_key, rid, next_status, ARGV[12], tally_experiment(rollout_key, rid, next_status))
  record_finished(rollout_key, rid, next_status, ARGV[8])
  expire_rollout(rollout_key, ARGV[9], ARGV[8], ARGV[2])
  redis.call('PUBLISH', KEYS[K + 3], rid)
end
return next_status
