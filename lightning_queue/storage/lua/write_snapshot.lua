-- Store a snapshot version and point "latest" at it (unless told not to), atomically: version 1 of
-- a new id (mode 'add') or version n+1 of an existing one (mode 'update', optionally compare-and-set).
-- The version being replaced is kept, unchanged, under its own key.
-- KEYS[1] snapshot hash, KEYS[2] snapshots index, KEYS[3] pointers hash, KEYS[4] sequence,
-- KEYS[5] snapshot events channel, KEYS[6] registry epoch (needs _epoch_prelude)
-- ARGV[1] resources_id, ARGV[2] payload, ARGV[3] encoding, ARGV[4] checksum, ARGV[5] size,
-- ARGV[6] now, ARGV[7] 'add' | 'update', ARGV[8] expected version or '', ARGV[9] who writes,
-- ARGV[10] pointer history length, ARGV[11] pointer history key prefix,
-- ARGV[12] this id's old-version key prefix ("{p}:snapshot:{id}:v:"),
-- ARGV[13] the epoch the writer knows ('' none yet), ARGV[14] the epoch it proposes if there is none,
-- ARGV[15] '1' to move "latest", '0' not to, ARGV[16] the version's metadata (JSON: message, author,
-- tags), ARGV[17] the parent: a resources_id or pointer name, '' for none (an update's parent
-- defaults to the version it replaces), ARGV[18] the parent's version or '' (its current one),
-- ARGV[19] snapshot key prefix ("{p}:snapshot:"), ARGV[20] the operation ('add_resources'...)
-- The metadata and parent are stored with the version and copied with it when it is replaced.
-- Returns {'ok', version, create_time, epoch, parent_id-or-'', parent_version-or-'', '1' if latest moved,
-- latest's previous target-or-''} | {'exists'} |
-- {'name_taken'} | {'missing'} | {'conflict', current} | {'no_parent', parent, version-or-''} |
-- {'epoch', current-or-''} (Redis lost its data since the writer last looked).
local epoch, current_epoch = establish_epoch(KEYS[6], ARGV[13], ARGV[14])
if not epoch then return {'epoch', current_epoch} end
local id = ARGV[1]
local exists = redis.call('EXISTS', KEYS[1]) == 1
local version, create_time
if ARGV[7] == 'add' then
  if exists then return {'exists'} end
  if redis.call('HEXISTS', KEYS[3], id) == 1 then return {'name_taken'} end
  version, create_time = 1, ARGV[6]
else
  if not exists then return {'missing'} end
  local current = tonumber(redis.call('HGET', KEYS[1], 'version'))
  if ARGV[8] ~= '' and tonumber(ARGV[8]) ~= current then
    return {'conflict', current}
  end
  version, create_time = current + 1, redis.call('HGET', KEYS[1], 'create_time')
end
-- The parent: named (an id or a pointer, at a stored version), or for an update the version replaced.
local parent_id, parent_version = '', ''
if ARGV[17] ~= '' then
  parent_id = redis.call('HGET', KEYS[3], ARGV[17]) or ARGV[17]
  local parent_current = tonumber(redis.call('HGET', ARGV[19] .. parent_id, 'version'))
  if not parent_current then return {'no_parent', ARGV[17], ARGV[18]} end
  parent_version = tonumber(ARGV[18]) or parent_current
  if parent_version > parent_current then return {'no_parent', ARGV[17], ARGV[18]} end
elseif ARGV[7] == 'update' then
  parent_id, parent_version = id, version - 1
end
if ARGV[7] == 'update' then
  local previous = version - 1
  local old = redis.call('HMGET', KEYS[1], 'resources', 'encoding', 'checksum', 'size', 'update_time', 'meta',
    'parent_id', 'parent_version')
  local kept = {'resources', old[1], 'encoding', old[2], 'checksum', old[3], 'size', old[4], 'update_time', old[5],
    'version', previous}
  -- versions written before metadata existed have none to keep
  if old[6] then table.insert(kept, 'meta'); table.insert(kept, old[6]) end
  if old[7] then
    table.insert(kept, 'parent_id'); table.insert(kept, old[7])
    table.insert(kept, 'parent_version'); table.insert(kept, old[8])
  end
  redis.call('HSET', ARGV[12] .. previous, unpack(kept))
  redis.call('HDEL', KEYS[1], 'parent_id', 'parent_version')
end
redis.call('HSET', KEYS[1], 'resources', ARGV[2], 'encoding', ARGV[3], 'checksum', ARGV[4], 'size', ARGV[5],
  'version', version, 'create_time', create_time, 'update_time', ARGV[6], 'meta', ARGV[16])
if parent_id ~= '' then
  redis.call('HSET', KEYS[1], 'parent_id', parent_id, 'parent_version', parent_version)
end
local moved, latest_from = {}, ''
if ARGV[15] ~= '0' then
  latest_from = move_pointer(KEYS[3], ARGV[11], 'latest', id, ARGV[6], ARGV[9], ARGV[10], ARGV[20], '') or ''
  moved.latest = id
end
local seq = announce(KEYS[4], KEYS[5], {op = 'write', id = id, version = version, pointers = moved})
redis.call('ZADD', KEYS[2], seq, id)
return {'ok', version, create_time, epoch, parent_id, parent_version, ARGV[15], latest_from}
