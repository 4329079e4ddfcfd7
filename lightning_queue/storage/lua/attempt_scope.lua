-- What the proxy needs to know about an attempt before it forwards a call (read only).
-- KEYS[1] rollout hash; ARGV[1] attempt key prefix ("{p}:rollout:{id}:attempt:")
-- Returns {} when the rollout is gone, else {rollout status, attempt_count, the current attempt's
-- attempt_id, status, resources_id, resources_version, the rollout's metadata JSON}.
local r = redis.call('HMGET', KEYS[1], 'status', 'attempt_count', 'metadata')
if not r[1] then return {} end
local n = r[2] or '0'
local a = redis.call('HMGET', ARGV[1] .. n, 'attempt_id', 'status', 'resources_id', 'resources_version')
return {r[1], n, a[1] or '', a[2] or '', a[3] or '', a[4] or '', r[3] or ''}
