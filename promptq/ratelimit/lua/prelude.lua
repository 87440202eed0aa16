-- Shared by every limiter script. Times are milliseconds from Redis's own clock, so hosts
-- with drifting clocks still agree. A bucket is a GCRA meter: `tat:<dim>` is the time at
-- which everything admitted so far has been paid for at the allowed rate.

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
end

local function num(value, default)
  if value == false or value == nil then return default end
  return tonumber(value)
end

local function put(key, field, value)
  redis.call('HSET', key, field, string.format('%.3f', value))
end

-- The share of the configured rate in force. A 429 cuts it and remembers the share that
-- was refused (the ceiling); it then climbs back over `recovery_ms` to just under that
-- ceiling, and past it only slowly (`probe_per_ms`), so a limit configured too high settles
-- just below what the upstream grants instead of tripping it again and again.
local function factor(state, now, recovery_ms, probe_per_ms)
  local base = num(redis.call('HGET', state, 'f:base'), 1)
  local since = num(redis.call('HGET', state, 'f:t0'), 0)
  local ceiling = num(redis.call('HGET', state, 'f:ceiling'), 1)
  local target = math.max(base, 0.95 * ceiling)
  local elapsed = now - since
  if elapsed < recovery_ms then
    return math.min(1, base + (target - base) * elapsed / recovery_ms)
  end
  return math.min(1, target + (elapsed - recovery_ms) * probe_per_ms * target)
end

-- Per-minute limit of one dimension: the configured one, lowered by what the upstream
-- last reported in its anthropic-ratelimit-*-limit headers, times the adaptive factor.
local function effective_limit(state, dim, configured, now, f)
  local limit = configured
  local cap = num(redis.call('HGET', state, 'cap:' .. dim), 0)
  local cap_until = num(redis.call('HGET', state, 'capu:' .. dim), 0)
  if cap > 0 and cap_until > now and (limit <= 0 or cap < limit) then limit = cap end
  if limit <= 0 then return 0 end
  return limit * f
end
