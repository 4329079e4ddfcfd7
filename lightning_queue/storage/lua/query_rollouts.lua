-- One page of rollout ids from the indexes, server-side, atomically (read-only but for scratch keys).
-- KEYS[1] scratch key ({p}:query:{token}): it and KEYS[1]..':'..g are written and deleted here.
-- KEYS[2...] index zsets, by group. ARGV[1] n groups, ARGV[2..n+1] each group's size (its keys
-- follow in KEYS in order). A rollout matches when it is in at least one index of every group (union
-- within a group, intersection across). Its score is its score in the first group (the enqueue time,
-- or the end time when the first group is {p}:rollouts:ended).
-- Then ARGV[n+2] 'desc' | 'asc', ARGV[n+3] range start ('' or a score, inclusive), ARGV[n+4] range
-- end ('' or a score, exclusive), ARGV[n+5] cursor score ('' for the first page), ARGV[n+6] cursor
-- member, ARGV[n+7] count.
-- Order: by score, ties by member (desc: greater first, as ZRANGE REV does). The cursor is the last
-- entry read: the page starts right after where it is, or would be (it may have left the indexes
-- since), so entries added meanwhile never shift a page.
-- Returns {member, score, ...}: at most count entries.
local n = tonumber(ARGV[1])
local at = 2
local sources, scratch = {}, {}
for g = 1, n do
  local size = tonumber(ARGV[1 + g])
  if size == 1 then
    table.insert(sources, KEYS[at])
  else
    local union = KEYS[1] .. ':' .. g
    local args = {'ZUNIONSTORE', union, size}
    for i = 0, size - 1 do table.insert(args, KEYS[at + i]) end
    table.insert(args, 'AGGREGATE'); table.insert(args, 'MAX')
    redis.call(unpack(args))
    table.insert(scratch, union)
    table.insert(sources, union)
  end
  at = at + size
end
local src = sources[1]
if #sources > 1 then
  -- Weight 1 for the first group, 0 for the others: the sum is the first group's score, exactly.
  local args = {'ZINTERSTORE', KEYS[1], #sources}
  for _, key in ipairs(sources) do table.insert(args, key) end
  table.insert(args, 'WEIGHTS')
  for g = 1, #sources do table.insert(args, g == 1 and 1 or 0) end
  redis.call(unpack(args))
  table.insert(scratch, KEYS[1])
  src = KEYS[1]
end
local o = n + 1
local desc = ARGV[o + 1] == 'desc'
local low, high = ARGV[o + 2], ARGV[o + 3]
local cscore, cmember, count = ARGV[o + 4], ARGV[o + 5], tonumber(ARGV[o + 6])

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
    -- Gone from the indexes: count what comes before where it would be (ties are one enqueue batch).
    if desc then after = redis.call('ZCOUNT', src, '(' .. cscore, '+inf')
    else after = redis.call('ZCOUNT', src, '-inf', '(' .. cscore) end
    for _, member in ipairs(redis.call('ZRANGE', src, cscore, cscore, 'BYSCORE')) do
      if (desc and member > cmember) or (not desc and member < cmember) then after = after + 1 end
    end
  end
  if after > pos then pos = after end
end

local out = {}
local page
if desc then
  page = redis.call('ZRANGE', src, pos, pos + count - 1, 'REV', 'WITHSCORES')
else
  page = redis.call('ZRANGE', src, pos, pos + count - 1, 'WITHSCORES')
end
local lo, hi = tonumber(low), tonumber(high)
for i = 1, #page, 2 do
  local score = tonumber(page[i + 1])
  if (desc and lo and score < lo) or (not desc and hi and score >= hi) then break end
  table.insert(out, page[i])
  table.insert(out, page[i + 1])
end
if #scratch > 0 then redis.call('DEL', unpack(scratch)) end
return out
