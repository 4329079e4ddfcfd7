-- Experiment tallies, loaded after _rollout_prelude by every script that moves a rollout to a
-- final status. When the rollout was enqueued through an experiment (its metadata names the
-- experiment and a variant, and the experiment exists), the variant's aggregates are updated in
-- the same script as the transition: atomically with it, and exactly once, as a final status is
-- never left. A report then reads these instead of every rollout record (experiments/report.py):
--   tally        hash   counts by final status, finished, rewarded, reward_sum, reward_sumsq, error:<type>,
--                       ran:<version>:<resources_id> (rollouts whose last attempt ran that snapshot version)
--   rewards      string one line "end_time reward latency" per finished rollout ('nan' when missing),
--                       in the order they finished: what the sequential test and the charts need
--   unit-rewards hash   unit -> "count sum last_end_time" of its rewards (paired comparisons)
-- The keys are the rollout key's prefix plus the infixes of core/keys.py (spelled in by scripts.py).
-- Returns the experiment's and the variant's names when the rollout was tallied (nothing otherwise),
-- so the metrics that follow (_final_metrics.lua) need not decode the metadata again.
local function num(value)
  return string.format('%.17g', value)
end

local function tally_experiment(rollout_key, rid, status)
  local r = redis.call('HMGET', rollout_key, 'metadata', 'result', 'error', 'start_time', 'end_time', 'ran')
  if not r[1] then return end
  local ok, meta = pcall(cjson.decode, r[1])
  if not ok or type(meta) ~= 'table' then return end
  local name, variant = meta['experiment'], meta['variant']
  if type(name) ~= 'string' or type(variant) ~= 'string' then return end
  local prefix = string.sub(rollout_key, 1, #rollout_key - #('__ROLLOUT_INFIX__' .. rid))
  local experiment = prefix .. '__EXPERIMENT_INFIX__' .. name
  if redis.call('EXISTS', experiment) == 0 then return end
  local tally = experiment .. '__TALLY_INFIX__' .. variant
  redis.call('HINCRBY', tally, status, 1)
  if r[6] then redis.call('HINCRBY', tally, 'ran:' .. r[6], 1) end
  if status == 'cancelled' then return name, variant end  -- counted in neither the success rate nor the rewards
  redis.call('HINCRBY', tally, 'finished', 1)
  local reward = nil
  if status == 'succeeded' and r[2] then
    local decoded, result = pcall(cjson.decode, r[2])
    if decoded and type(result) == 'table' and type(result['reward']) == 'number' then reward = result['reward'] end
  elseif status == 'failed' and r[3] then
    local decoded, err = pcall(cjson.decode, r[3])
    if decoded and type(err) == 'table' and type(err['type']) == 'string' then
      redis.call('HINCRBY', tally, 'error:' .. err['type'], 1)
    end
  end
  local end_time = tonumber(r[5]) or 0
  local latency = 'nan'
  if r[4] and r[5] then latency = num(end_time - tonumber(r[4])) end
  local shown = 'nan'
  if reward then
    shown = num(reward)
    redis.call('HINCRBY', tally, 'rewarded', 1)
    redis.call('HINCRBYFLOAT', tally, 'reward_sum', shown)
    redis.call('HINCRBYFLOAT', tally, 'reward_sumsq', num(reward * reward))
    local unit = meta['unit']
    if type(unit) == 'string' then
      local units = experiment .. '__UNIT_REWARDS_INFIX__' .. variant
      local count, sum, last = 0, 0, 0
      local held = redis.call('HGET', units, unit)
      if held then
        local a, b, c = string.match(held, '^(%S+) (%S+) (%S+)$')
        count, sum, last = tonumber(a), tonumber(b), tonumber(c)
      end
      redis.call('HSET', units, unit, (count + 1) .. ' ' .. num(sum + reward) .. ' ' .. num(math.max(last, end_time)))
    end
  end
  redis.call('APPEND', experiment .. '__REWARDS_INFIX__' .. variant, num(end_time) .. ' ' .. shown .. ' ' .. latency .. '\n')
  return name, variant
end
