-- The registry epoch (storage/epoch.py): a random id written once, by whatever writes first.
-- `expected` '' (the writer knows no epoch yet): returns the registry's epoch, created from
-- `proposed` if it has none. Otherwise returns it only if it is `expected`; else false and the
-- epoch Redis holds ('' for none): Redis lost its data since the writer last looked, and the
-- caller writes nothing.
local function establish_epoch(key, expected, proposed)
  local current = redis.call('GET', key)
  if expected ~= '' then
    if current ~= expected then return false, current or '' end
    return current
  end
  if not current then
    redis.call('SET', key, proposed)
    current = proposed
  end
  return current
end
