-- What one client key may use, refused rather than queued (promptq.quotas,
-- promptq.ratelimit.quota): a rate's GCRA meter and a count with a ceiling.

-- Take one unit of a rate of `per_minute` now, with `burst_ms` of it at once, or say how
-- long until one is free. Returns 0 when taken, else the ms to wait.
local function take_unit(bucket, per_minute, burst_ms)
  local per_unit = 60000 / tonumber(per_minute)
  local allowance = math.max(tonumber(burst_ms), per_unit)
  local now = now_ms()
  local tat = math.max(num(redis.call('HGET', bucket, 'tat'), 0), now)
  local wait = tat + per_unit - allowance - now
  if wait > 0 then return string.format('%.0f', wait) end
  put(bucket, 'tat', tat + per_unit)
  redis.call('PEXPIRE', bucket, math.floor(allowance) + 60000)
  return 0
end

-- Add `adding` to a count unless the count is unknown or would pass `most`; the count
-- lives `lifetime_ms` from then. Returns 1 when added, 0 when the database must count.
local function add_within(count_key, adding, most, lifetime_ms)
  local count = redis.call('GET', count_key)
  if not count or tonumber(count) + tonumber(adding) > tonumber(most) then return 0 end
  redis.call('INCRBY', count_key, adding)
  redis.call('PEXPIRE', count_key, lifetime_ms)
  return 1
end
