-- Note that the task messages of these rollouts were sent, so an idempotent enqueue retried
-- later does not send them again. A record that is gone (expired) is not recreated.
-- KEYS rollout hashes; ARGV[1] now
for _, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 1 then
    redis.call('HSET', key, 'published', ARGV[1])
  end
end
return #KEYS
