-- Keep the concurrency slots of calls still in flight, putting back any a Redis lost (a
-- failover to a replica that had not yet seen it, a restart): within one renewal every
-- call in flight holds its slot again. The caller renews only grants it still holds, and
-- never after settling one, so no settled slot comes back.
-- KEYS: in-flight zsets, one per grant.
-- ARGV: 1 lease ms, then one grant id per key, then one job id per key (whose stand-in
-- slot from a rebuild, if any, the grant's own slot replaces).
local now = now_ms()
local n = #KEYS
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, now + tonumber(ARGV[1]), ARGV[i + 1])
  local job = ARGV[n + i + 1]
  if job then redis.call('ZREM', key, 'job:' .. job) end
end
return n
