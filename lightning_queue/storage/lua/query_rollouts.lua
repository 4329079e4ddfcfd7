-- One page of rollout ids from the indexes, server-side, atomically (read-only but for scratch keys).
-- KEYS[1] scratch key ({p}:query:{token}): may be written, and is deleted here.
-- KEYS[2...] index zsets, by group. ARGV[1] n groups, then for each group its size and whether its
-- scores are the sort key ('1' or '0'; at least one group's are); its keys follow in KEYS in order. A
-- rollout matches when it is in at least one index of every group (union within a group, intersection
-- across); its score is the sort key.
-- Then ARGV[o+1] 'desc' | 'asc', ARGV[o+2] range start ('' or a score, inclusive), ARGV[o+3] range end
-- ('' or a score, exclusive), ARGV[o+4] cursor score ('' for the first page), ARGV[o+5] cursor member,
-- ARGV[o+6] matches wanted, ARGV[o+7] index entries to examine at most.
-- Plan: one group scored by the sort key is walked in order from the cursor, and each entry is
-- checked against the other groups (ZSCORE: O(1) each), so a page costs what it examines, not the
-- size of the indexes. A walked group of several zsets (several statuses, an experiment's variants:
-- walked only when every group is a union) is first unioned into the scratch key: that costs its size.
-- Order: by score, ties by member (desc: greater first, as ZREVRANGE does). Commands of Redis 5.0. The cursor is the last
-- entry examined: the walk starts right after where it is, or would be (it may have left the indexes
-- since), so entries added meanwhile never shift a page.
-- Returns {exhausted 1|0, last member examined, its score, entries examined, member, score, ...}.
local n = tonumber(ARGV[1])
local groups = {}
local at = 2
for g = 1, n do
  local size, sorts = tonumber(ARGV[2 * g]), ARGV[2 * g + 1] == '1'
  local keys = {}
  for i = 0, size - 1 do table.insert(keys, KEYS[at + i]) end
  at = at + size
  table.insert(groups, {keys = keys, sorts = sorts})
end
local o = 2 * n + 1
local desc = ARGV[o + 1] == 'desc'
local low, high = ARGV[o + 2], ARGV[o + 3]
local cscore, cmember = ARGV[o + 4], ARGV[o + 5]
local wanted, budget = tonumber(ARGV[o + 6]), tonumber(ARGV[o + 7])

local scratch = {}
local src, checks = nil, {}
-- The walk follows a group scored by the sort key: the smallest single zset if there is one (no
-- union to build), else the smallest union.
local best = nil
for g, group in ipairs(groups) do
  if group.sorts then
    local size = 0
    for _, key in ipairs(group.keys) do size = size + redis.call('ZCARD', key) end
    local rank = {#group.keys > 1 and 1 or 0, size}
    if not best or rank[1] < best.rank[1] or (rank[1] == best.rank[1] and rank[2] < best.rank[2]) then
      best = {g = g, rank = rank}
    end
  end
end
for g, group in ipairs(groups) do
  if g ~= best.g then table.insert(checks, group.keys) end
end
local driver = groups[best.g].keys
if #driver == 1 then
  src = driver[1]
else
  local args = {'ZUNIONSTORE', KEYS[1], #driver}
  for _, key in ipairs(driver) do table.insert(args, key) end
  table.insert(args, 'AGGREGATE'); table.insert(args, 'MAX')
  redis.call(unpack(args))
  table.insert(scratch, KEYS[1])
  src = KEYS[1]
end

-- The first position to read: past the range's far side, and past the cursor.
local pos = 0
if desc and high ~= '' then pos = redis.call('ZCOUNT', src, high, '+inf') end
if not desc and low ~= '' then pos = redis.call('ZCOUNT', src, '-inf', '(' .. low) end
if cscore ~= '' then
  local s = tonumber(cscore)
  local held = redis.call('ZSCORE', src, cmember)
  local after
  if held and tonumber(held) == s then
    after = (desc and redis.call('ZREVRANK', src, cmember) or redis.call('ZRANK', src, cmember)) + 1
  else
    -- Gone from the index: count what comes before where it would be (ties are one enqueue batch).
    if desc then after = redis.call('ZCOUNT', src, '(' .. cscore, '+inf')
    else after = redis.call('ZCOUNT', src, '-inf', '(' .. cscore) end
    for _, member in ipairs(redis.call('ZRANGEBYSCORE', src, cscore, cscore)) do
      if (desc and member > cmember) or (not desc and member < cmember) then after = after + 1 end
    end
  end
  if after > pos then pos = after end
end

local function in_every_group(member)
  for _, keys in ipairs(checks) do
    local found = false
    for _, key in ipairs(keys) do
      if redis.call('ZSCORE', key, member) then found = true; break end
    end
    if not found then return false end
  end
  return true
end

local lo, hi = tonumber(low), tonumber(high)
local out, matched, examined, exhausted = {}, 0, 0, false
local last_member, last_score = '', ''
while matched < wanted and examined < budget and not exhausted do
  local window = math.min(budget - examined, math.max(2 * (wanted - matched), 32))
  local page
  if desc then
    page = redis.call('ZREVRANGE', src, pos, pos + window - 1, 'WITHSCORES')
  else
    page = redis.call('ZRANGE', src, pos, pos + window - 1, 'WITHSCORES')
  end
  if #page < 2 * window then exhausted = true end
  for i = 1, #page, 2 do
    local score = tonumber(page[i + 1])
    if (desc and lo and score < lo) or (not desc and hi and score >= hi) then exhausted = true; break end
    examined = examined + 1
    pos = pos + 1
    last_member, last_score = page[i], page[i + 1]
    if in_every_group(page[i]) then
      table.insert(out, page[i]); table.insert(out, page[i + 1])
      matched = matched + 1
      if matched == wanted then
        -- Stopped on a match: more may follow, unless this was the index's last entry.
        exhausted = exhausted and i + 1 == #page
        break
      end
    end
  end
end
if #scratch > 0 then redis.call('DEL', unpack(scratch)) end
local reply = {exhausted and 1 or 0, last_member, last_score, examined}
for _, v in ipairs(out) do table.insert(reply, v) end
return reply
