-- Delete a snapshot, every version of it, atomically; refused while pointers name it or
-- unfinished rollouts use it, unless forced: then those pointers are unset (latest falls back
-- to the newest remaining snapshot) and those rollouts fail with the given error. A protected
-- pointer naming it refuses the delete, forced or not: unprotect it or move it first.
-- Needs _rollout_prelude (KEYS[1..K] status indexes), _experiment_tally, _final_metrics, _finished_stream and _registry_prelude. Then:
-- KEYS[K+1] snapshot hash, KEYS[K+2] snapshots index, KEYS[K+3] pointers hash, KEYS[K+4] sequence,
-- KEYS[K+5] snapshot events channel, KEYS[K+6] the snapshot's rollouts index, KEYS[K+7] rollout events channel,
-- KEYS[K+8] its LLM usage rollup (per version; deleted with it), KEYS[K+9] pointer protection hash
-- ARGV[1] resources_id, ARGV[2] '1' to force, ARGV[3] now, ARGV[4] error JSON for failed rollouts,
-- ARGV[5] rollout key prefix ("{p}:rollout:"), ARGV[6] history key prefix, ARGV[7] history length,
-- ARGV[8] who, ARGV[9] old-version key prefix ("{p}:snapshot:{id}:v:"),
-- ARGV[10] TTL of a finished rollout in seconds or '' (none), ARGV[11] attempt infix (":attempt:"),
-- ARGV[12] the metric series caps ("<snapshot versions> <variants>", see _final_metrics.lua),
-- ARGV[13] the operation (pointer history "op")
-- Returns {'missing'} | {'in_use', cjson {pointers, rollouts}} | {'deleted', cjson {pointers, rollouts}}
--       | {'protected', pointer, protection JSON}.
local id = ARGV[1]
local version = redis.call('HGET', KEYS[K + 1], 'version')
if not version then return {'missing'} end
local pointers = {}
local flat = redis.call('HGETALL', KEYS[K + 3])
for i = 1, #flat, 2 do
  if flat[i + 1] == id then table.insert(pointers, flat[i]) end
end
for _, name in ipairs(pointers) do
  local protection = redis.call('HGET', KEYS[K + 9], name)
  if protection then return {'protected', name, protection} end
end
local active = {}
for _, rid in ipairs(redis.call('ZRANGE', KEYS[K + 6], 0, -1)) do
  local status = redis.call('HGET', ARGV[5] .. rid, 'status')
  if status and not TERMINAL[status] then table.insert(active, rid) end
end
local report = cjson.encode({pointers = pointers, rollouts = active})
if (#pointers > 0 or #active > 0) and ARGV[2] ~= '1' then
  return {'in_use', report}
end
for _, rid in ipairs(active) do
  local key = ARGV[5] .. rid
  local r = redis.call('HMGET', key, 'status', 'attempt_count', 'enqueue_time')
  redis.call('HSET', key, 'status', 'failed', 'end_time', ARGV[3], 'error', ARGV[4])
  move_status(rid, r[1], 'failed', r[3])
  record_final_metrics(key, rid, 'failed', ARGV[12], tally_experiment(key, rid, 'failed'))
  record_finished(key, rid, 'failed', ARGV[10])
  expire_rollout(key, key .. ARGV[11], ARGV[10], r[2])
  redis.call('PUBLISH', KEYS[K + 7], rid)
end
for v = 1, tonumber(version) - 1 do
  redis.call('DEL', ARGV[9] .. v)
end
redis.call('DEL', KEYS[K + 1], KEYS[K + 8])
redis.call('ZREM', KEYS[K + 2], id)
-- Pointers naming it are unset, except latest, which falls back to the newest remaining snapshot.
local moved = {}
for _, name in ipairs(pointers) do
  local to = false
  if name == 'latest' then to = redis.call('ZREVRANGE', KEYS[K + 2], 0, 0)[1] or false end
  move_pointer(KEYS[K + 3], ARGV[6], name, to, ARGV[3], ARGV[8], ARGV[7], ARGV[13], 'snapshot ' .. id .. ' deleted')
  moved[name] = to
end
announce(KEYS[K + 4], KEYS[K + 5], {op = 'delete', id = id, pointers = moved})
return {'deleted', report}
