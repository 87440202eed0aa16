-- What the upstream said about its limits, applied for every worker at once.
-- KEYS: 1 state hash
-- ARGV: 1 pause ms (0: none; a 429's retry-after or a reported reset),
--       2 throttled (1 when the upstream answered 429), 3 cut factor, 4 min factor,
--       5 debounce ms, 6 recovery ms, 7 cap ttl ms,
--       8 request limit, 9 input token limit, 10 output token limit (0: not reported),
--       11 probe per ms
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
redis.call('PEXPIRE', state, 86400000)
return 1
