-- Keep the concurrency slots of calls still in flight. KEYS: in-flight zsets, one per grant.
-- ARGV: 1 lease ms, then one grant id per key.
local now = now_ms()
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, 'XX', now + tonumber(ARGV[1]), ARGV[i + 1])
end
return #KEYS
