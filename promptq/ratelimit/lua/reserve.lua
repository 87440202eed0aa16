-- A client key's own requests per minute: reserve the next free start time, so a key that
-- submits faster than its rate has its jobs spread out instead of refused.
-- KEYS: 1 the key's bucket hash. ARGV: 1 rpm, 2 burst ms
-- Returns the delay in ms before the job may go.
local bucket = KEYS[1]
local per_unit = 60000 / tonumber(ARGV[1])
local allowance = math.max(tonumber(ARGV[2]), per_unit)
local now = now_ms()
local tat = math.max(num(redis.call('HGET', bucket, 'tat'), 0), now)
local start = math.max(now, tat + per_unit - allowance)
put(bucket, 'tat', tat + per_unit)
redis.call('PEXPIRE', bucket, 86400000)
return string.format('%.0f', start - now)
