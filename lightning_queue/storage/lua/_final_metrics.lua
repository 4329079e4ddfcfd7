-- Prometheus aggregates, loaded after _rollout_prelude by every script that moves a rollout to a
-- final status, and called once per rollout with that transition: so they are updated atomically with
-- it and exactly once (a final status is never left), and the exporter reads a bounded number of
-- hashes (ops/monitoring.py) instead of rollout records. Keys (core/keys.py, infixes spelled in by
-- scripts.py), built from the rollout key's prefix as the experiment tally's are:
--   {p}:metrics                      the whole queue: n:<status>, d:<i>/ds (duration), w:<i>/ws (queue wait),
--                                    folded:snapshot, folded:variant
--   {p}:metrics:snapshot:<id>:<ver>  per snapshot version the rollout ran with (its record's 'ran'):
--                                    n:<status>, d:<i>/ds, rn/rs/rmin/rmax (rewards of succeeded rollouts)
--   {p}:metrics:variant:<exp>:<var>  the same per experiment variant (the names tally_experiment returned:
--                                    the rollout's metadata names them and the experiment exists)
--   {p}:metrics:snapshots, {p}:metrics:variants  zsets member -> end time of its last finished rollout
-- Histogram buckets are counted per bucket (not cumulative; the exporter sums them up): bucket i is the
-- first bound >= the value, #bounds + 1 the +Inf one. Bounds come from core/metrics.py.
-- Past a cap ('caps' = "<snapshot versions> <variants>", from Settings), the least recently finished
-- series is folded into the '<...>:other' hash (counts and sums added, min/max merged) and its own
-- hash deleted: memory and exported label sets stay bounded whatever the number of snapshots.
-- Cost per rollout: one HMGET of the record, then one HMGET and one HSET per series (at most three)
-- and a ZADD per named series; no key per rollout.
local DURATION_BOUNDS = {__DURATION_BUCKETS__}
local QUEUE_WAIT_BOUNDS = {__QUEUE_WAIT_BUCKETS__}

local function metric_num(value)
  return string.format('%.17g', value)
end

local function bucket_of(bounds, value)
  for i, bound in ipairs(bounds) do
    if value <= bound then return i end
  end
  return #bounds + 1
end

-- Add one finished rollout to the series at `key`: one HMGET, one HSET.
local function add_to_series(key, status, duration, wait, reward)
  local names = {'n:' .. status}
  local nd, nw, nr = 0, 0, 0
  if duration then
    table.insert(names, 'd:' .. bucket_of(DURATION_BOUNDS, duration)); table.insert(names, 'ds'); nd = #names - 1
  end
  if wait then
    table.insert(names, 'w:' .. bucket_of(QUEUE_WAIT_BOUNDS, wait)); table.insert(names, 'ws'); nw = #names - 1
  end
  if reward then
    for _, name in ipairs({'rn', 'rs', 'rmin', 'rmax'}) do table.insert(names, name) end
    nr = #names - 3
  end
  local held = redis.call('HMGET', key, unpack(names))
  local function old(i) return tonumber(held[i]) or 0 end
  local out = {names[1], string.format('%d', old(1) + 1)}
  local function put(i, value) table.insert(out, names[i]); table.insert(out, value) end
  if nd > 0 then put(nd, string.format('%d', old(nd) + 1)); put(nd + 1, metric_num(old(nd + 1) + duration)) end
  if nw > 0 then put(nw, string.format('%d', old(nw) + 1)); put(nw + 1, metric_num(old(nw + 1) + wait)) end
  if nr > 0 then
    put(nr, string.format('%d', old(nr) + 1))
    put(nr + 1, metric_num(old(nr + 1) + reward))
    put(nr + 2, metric_num(held[nr + 2] and math.min(tonumber(held[nr + 2]), reward) or reward))
    put(nr + 3, metric_num(held[nr + 3] and math.max(tonumber(held[nr + 3]), reward) or reward))
  end
  redis.call('HSET', key, unpack(out))
end

-- Note `member`'s series as the most recently finished; past `cap` series, fold the least recent into
-- the 'other' hash. Called after the series was written, so even a member folded at once (its end
-- time older than every other's) leaves no orphan hash.
local function keep_series_capped(index, series_prefix, member, score, cap, totals, kind)
  if redis.call('ZADD', index, score, member) == 0 then return end
  local over = redis.call('ZCARD', index) - cap
  if over <= 0 then return end
  local other = series_prefix .. '__METRICS_OTHER__'
  for _, old in ipairs(redis.call('ZRANGE', index, 0, over - 1)) do
    local flat = redis.call('HGETALL', series_prefix .. old)
    if #flat > 0 then
      local names = {}
      for i = 1, #flat, 2 do table.insert(names, flat[i]) end
      local held = redis.call('HMGET', other, unpack(names))
      local out = {}
      for i = 1, #flat, 2 do
        local name, value, was = flat[i], tonumber(flat[i + 1]), tonumber(held[(i + 1) / 2])
        if was then
          if name == 'rmin' then value = math.min(was, value)
          elseif name == 'rmax' then value = math.max(was, value)
          else value = was + value end
        end
        table.insert(out, name)
        table.insert(out, metric_num(value))
      end
      redis.call('HSET', other, unpack(out))
      redis.call('DEL', series_prefix .. old)
    end
  end
  redis.call('ZREMRANGEBYRANK', index, 0, over - 1)
  redis.call('HINCRBY', totals, 'folded:' .. kind, over)
end

-- The aggregates of one rollout reaching final `status`. `caps`: "<snapshot versions> <variants>";
-- `experiment`, `variant`: what tally_experiment returned (nil: not an experiment's rollout).
local function record_final_metrics(rollout_key, rid, status, caps, experiment, variant)
  local r = redis.call('HMGET', rollout_key, 'enqueue_time', 'start_time', 'end_time', 'ran', 'result')
  local prefix = string.sub(rollout_key, 1, #rollout_key - #('__ROLLOUT_INFIX__' .. rid))
  local totals = prefix .. '__METRICS_INFIX__'
  local enqueued, started, ended = tonumber(r[1]), tonumber(r[2]), tonumber(r[3]) or 0
  local duration, wait = nil, nil
  if started and r[3] then duration = math.max(ended - started, 0) end
  if started and enqueued then wait = math.max(started - enqueued, 0) end
  add_to_series(totals, status, duration, wait, nil)
  local reward = nil
  if status == 'succeeded' and r[5] then
    local ok, result = pcall(cjson.decode, r[5])
    if ok and type(result) == 'table' and type(result['reward']) == 'number' then reward = result['reward'] end
  end
  local snapshot_cap, variant_cap = string.match(caps, '^(%d+) (%d+)$')
  -- One series of a snapshot version or a variant: its aggregate, and the capped index of them.
  local function add_to_member(member, series_suffix, index_suffix, cap, kind)
    local series_prefix = totals .. series_suffix
    add_to_series(series_prefix .. member, status, duration, nil, reward)
    keep_series_capped(totals .. index_suffix, series_prefix, member, ended, tonumber(cap), totals, kind)
  end
  if r[4] then  -- "<version>:<resources_id>" of the last attempt that started (store.py)
    local version, id = string.match(r[4], '^(%d+):(.*)$')
    if version then
      add_to_member(id .. ':' .. version, '__METRICS_SNAPSHOT_SUFFIX__', '__METRICS_SNAPSHOTS_SUFFIX__',
        snapshot_cap, 'snapshot')
    end
  end
  if experiment and variant then
    add_to_member(experiment .. ':' .. variant, '__METRICS_VARIANT_SUFFIX__', '__METRICS_VARIANTS_SUFFIX__',
      variant_cap, 'variant')
  end
end
