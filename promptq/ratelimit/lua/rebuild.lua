-- Put back the concurrency slots of a model's running calls after its state was lost: one
-- stand-in slot per job the database says is running, until that job's lease ends (its
-- worker's next renewal swaps in the grant's own slot). Then mark the state rebuilt. Only
-- the first of several processes rebuilding at once does it.
-- KEYS: 1 state hash, 2 in-flight zset. ARGV: pairs of (job id, ms its lease has left).
local state, inflight = KEYS[1], KEYS[2]
if redis.call('HEXISTS', state, 'rebuilt') == 1 then return 0 end
local now = now_ms()
local put_back = 0
for i = 1, #ARGV, 2 do
  redis.call('ZADD', inflight, 'NX', now + tonumber(ARGV[i + 1]), 'job:' .. ARGV[i])
  put_back = put_back + 1
end
redis.call('HSET', state, 'rebuilt', string.format('%.0f', now))
redis.call('PEXPIRE', state, 86400000)
return put_back
