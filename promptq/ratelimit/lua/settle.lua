-- After a call: free its concurrency slot, correct the token meters by what the call really
-- used (input estimated before the call; output reserved at max_tokens), and remember the
-- prompt's cacheable prefixes when the upstream reported caching them.
-- KEYS: 1 state hash, 2 in-flight zset, 3.. markers of the prompt's cached prefixes
-- ARGV: 1 grant id, 2 input tokens to add back (negative: more were used), 3 output tokens
--       to add back, 4 requests to add back (1 when the call never happened),
--       5 rpm, 6 input tpm, 7 output tpm, 8 recovery ms, 9 probe per ms,
--       10.. how long each marker in KEYS 3.. lives (the cache's lifetime, ms)
local state, inflight = KEYS[1], KEYS[2]
local refunds = {req = tonumber(ARGV[4]), inp = tonumber(ARGV[2]), out = tonumber(ARGV[3])}
local limits = {req = tonumber(ARGV[5]), inp = tonumber(ARGV[6]), out = tonumber(ARGV[7])}
local now = now_ms()
redis.call('ZREM', inflight, ARGV[1])
local f = factor(state, now, tonumber(ARGV[8]), tonumber(ARGV[9]))
for _, dim in ipairs({'req', 'inp', 'out'}) do
  local limit = effective_limit(state, dim, limits[dim], now, f)
  local tat = num(redis.call('HGET', state, 'tat:' .. dim), nil)
  if limit > 0 and tat and refunds[dim] ~= 0 then
    put(state, 'tat:' .. dim, tat - refunds[dim] * 60000 / limit)
  end
end
for i = 3, #KEYS do
  redis.call('SET', KEYS[i], 1, 'PX', math.floor(tonumber(ARGV[i + 7])))
end
return 1
