-- A rate that refuses instead of queueing: take one unit of a key's quota now, or say how
-- long until one is free. A GCRA meter of `burst` ms of the rate.
-- KEYS: 1 the bucket hash. ARGV: 1 units per minute, 2 burst ms
-- Returns 0 when taken, else the ms to wait.
local bucket = KEYS[1]
local per_unit = 60000 / tonumber(ARGV[1])
local allowance = math.max(tonumber(ARGV[2]), per_unit)
local now = now_ms()
local tat = math.max(num(redis.call('HGET', bucket, 'tat'), 0), now)
local wait = tat + per_unit - allowance - now
if wait > 0 then return string.format('%.0f', wait) end
put(bucket, 'tat', tat + per_unit)
redis.call('PEXPIRE', bucket, math.floor(allowance) + 60000)
return 0
