-- What the upstream said about its limits, applied for every worker at once.
-- KEYS: 1 state hash
-- ARGV: 1 pause ms (0: none; a 429's retry-after or a reported reset),
--       2 throttled (1 when the upstream answered 429), 3 cut factor, 4 min factor,
--       5 debounce ms, 6 recovery ms, 7 cap ttl ms,
--       8 request limit, 9 input token limit, 10 output token limit (0: not reported),
--       11 probe per ms, 12 configured input tpm, 13 configured output tpm (0: unlimited),
--       14 token burst ms, 15 input tokens remaining, 16 output tokens remaining (-1: not
--       reported)
local state = KEYS[1]
local now = now_ms()
local pause = tonumber(ARGV[1])
if pause > 0 then
  local until_ms = now + pause
  if until_ms > num(redis.call('HGET', state, 'paused_until'), 0) then
    put(state, 'paused_until', until_ms)
  end
end
if ARGV[2] == '1' then
  -- Multiplicative decrease, once per burst of 429s (calls in flight together all see one).
  local last = num(redis.call('HGET', state, 'f:cut'), 0)
  if now - last >= tonumber(ARGV[5]) then
    local current = factor(state, now, tonumber(ARGV[6]), tonumber(ARGV[11]))
    put(state, 'f:ceiling', current)
    put(state, 'f:base', math.max(tonumber(ARGV[4]), current * tonumber(ARGV[3])))
    put(state, 'f:t0', now)
    put(state, 'f:cut', now)
  end
end
local caps = {req = tonumber(ARGV[8]), inp = tonumber(ARGV[9]), out = tonumber(ARGV[10])}
for _, dim in ipairs({'req', 'inp', 'out'}) do
  if caps[dim] > 0 then
    put(state, 'cap:' .. dim, caps[dim])
    put(state, 'capu:' .. dim, now + tonumber(ARGV[7]))
  end
end
-- The upstream's word on what is left in its token buckets: where it says less than the
-- meter holds, the meter drops to it (someone else spending on the account, or an estimate
-- that was low). It never raises the meter: the figure is as of the answer, before calls
-- admitted since then reached the upstream.
local configured = {inp = tonumber(ARGV[12]), out = tonumber(ARGV[13])}
local remaining = {inp = tonumber(ARGV[15]), out = tonumber(ARGV[16])}
local token_burst = tonumber(ARGV[14])
local f = factor(state, now, tonumber(ARGV[6]), tonumber(ARGV[11]))
for _, dim in ipairs({'inp', 'out'}) do
  local limit = effective_limit(state, dim, configured[dim], now, f)
  if remaining[dim] >= 0 and limit > 0 then
    local per_unit = 60000 / limit
    local floor = now + token_burst - remaining[dim] * per_unit
    if floor > num(redis.call('HGET', state, 'tat:' .. dim), 0) then
      put(state, 'tat:' .. dim, floor)
    end
  end
end
redis.call('PEXPIRE', state, 86400000)
return 1
