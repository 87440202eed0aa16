-- Admit one upstream call, or say why not and for how long.
-- KEYS: 1 state hash, 2 in-flight zset, 3 waiting zset, 4 waiting costs hash, 5 models set,
--       6 fair-queue hash, 7.. the markers of the prompt's cacheable prefixes, longest
--       first (direct mode)
-- ARGV: 1 mode ("direct": a job arriving; "head": the first waiting job), 2 model,
--       3 job id, 4 input cost, 5 output cost, 6 priority rank (direct mode),
--       7 rpm, 8 input tpm, 9 output tpm (0: unlimited), 10 max concurrency (0: unlimited),
--       11 request burst ms, 12 slot lease ms, 13 recovery ms, 14 probe per ms, 15 grant id,
--       16 token burst ms, 17 client key id, 18 most high-priority jobs one client key may
--       have waiting (past it, its next ones wait as normal), 19.. the estimated tokens of
--       each prefix in KEYS 7..
-- Returns {"granted", job, rank, input cost, output cost} | {"queued", reason, wait ms} | {"denied", reason, wait ms}
--         | {"empty"} | {"rebuild"} (a model with a concurrency limit whose in-flight slots
--         are not known to be whole: the caller rebuilds them, then asks again)
local state, inflight, waiting, costs, models = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local fair = KEYS[6]
local mode, model = ARGV[1], ARGV[2]
local job, input_cost, output_cost, rank = ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6]
local limits = {req = tonumber(ARGV[7]), inp = tonumber(ARGV[8]), out = tonumber(ARGV[9])}
local max_concurrency, burst = tonumber(ARGV[10]), tonumber(ARGV[11])
local lease, recovery, probe = tonumber(ARGV[12]), tonumber(ARGV[13]), tonumber(ARGV[14])
local grant, token_burst = ARGV[15], tonumber(ARGV[16])
local client_key, high_cap = ARGV[17], tonumber(ARGV[18])
local now = now_ms()

-- A state without the rebuilt mark is a new Redis, a wiped one, or one that has forgotten
-- the model: the calls in flight may hold slots it does not list. Nothing is granted
-- until the caller has put back a slot for each running job (rebuild.lua).
if max_concurrency > 0 and redis.call('HEXISTS', state, 'rebuilt') == 0 then
  return {'rebuild'}
end

-- A prefix the upstream has in its cache (seen cached by an earlier call, within the cache's
-- lifetime) will be read from it, and cache reads do not count as input: only the rest of
-- the prompt is charged. The longest known prefix wins, as at the upstream.
if mode == 'direct' then
  for i = 7, #KEYS do
    if redis.call('EXISTS', KEYS[i]) == 1 then
      input_cost = math.max(1, input_cost - tonumber(ARGV[i + 12]))
      break
    end
  end
end

-- Fair queuing across client keys (start-time fair queuing, one unit per job): each key's
-- waiting jobs of a priority form a queue of their own, in the order the jobs were made (job
-- ids sort by creation), and only each key's first job stands in the model's queue, scored
-- by priority rank, then virtual time. A key's next job gets the virtual time one past its
-- previous one's, and a key arriving gets one past the priority's clock (the virtual time
-- of the job last dispatched), so a key that queued 600 jobs does not stand in front of one
-- that queues 5 later: they take turns. A key may have only `high_cap` jobs waiting at high
-- priority; past that they wait as normal ones. Sub-queue names share the model's hash tag.
local function key_queue(r, k) return waiting .. ':' .. r .. ':' .. k end

local function stand_in_line(r, k, first)
  local clock = num(redis.call('HGET', fair, 'v:' .. r), 0)
  local last = num(redis.call('HGET', fair, 'k:' .. r .. ':' .. k), 0)
  local vtime = math.max(clock, last) + 1
  redis.call('HSET', fair, 'k:' .. r .. ':' .. k, vtime)
  redis.call('ZADD', waiting, r * 1e13 + vtime, first)
end

local function enqueue(reason, wait)
  if redis.call('HEXISTS', costs, job) == 1 then
    -- Its message came again: it keeps its place.
    return {'queued', reason, string.format('%.0f', wait)}
  end
  rank = tonumber(rank)
  if rank == 0 then
    if num(redis.call('HGET', fair, 'h:' .. client_key), 0) >= high_cap then
      rank = 1
    else
      redis.call('HINCRBY', fair, 'h:' .. client_key, 1)
    end
  end
  redis.call('HSET', costs, job, input_cost .. ':' .. output_cost .. ':' .. rank .. ':' .. client_key)
  local queue = key_queue(rank, client_key)
  redis.call('ZADD', queue, 0, job)
  local first = redis.call('ZRANGE', queue, 0, 1)
  if first[1] == job then
    if first[2] then
      -- Made before the key's job in line (its message was slower): it takes that place.
      local score = redis.call('ZSCORE', waiting, first[2])
      redis.call('ZREM', waiting, first[2])
      redis.call('ZADD', waiting, score, job)
    else
      stand_in_line(rank, client_key, job)
    end
  end
  redis.call('SADD', models, model)
  redis.call('PEXPIRE', fair, 86400000)
  redis.call('PEXPIRE', queue, 86400000)
  return {'queued', reason, string.format('%.0f', wait)}
end

local head, head_score = nil, nil
if mode == 'direct' then
  -- Jobs already waiting go first: a newcomer queues behind them, whatever the budget.
  if redis.call('HLEN', costs) > 0 then return enqueue('queue', 0) end
else
  head = redis.call('ZRANGE', waiting, 0, 0, 'WITHSCORES')
  if #head == 0 then
    redis.call('SREM', models, model)
    return {'empty'}
  end
  job, head_score = head[1], head[2]
  rank = tostring(math.floor(tonumber(head[2]) / 1e13))
  local cost = redis.call('HGET', costs, job)
  if cost then
    local parts = {}
    for part in string.gmatch(cost, '[^:]+') do parts[#parts + 1] = part end
    input_cost, output_cost = tonumber(parts[1]), tonumber(parts[2])
    client_key = parts[4] or ''
  end
end

local function refuse(reason, wait)
  if mode == 'direct' then return enqueue(reason, wait) end
  return {'denied', reason, string.format('%.0f', wait)}
end

local paused = num(redis.call('HGET', state, 'paused_until'), 0)
if paused > now then return refuse('upstream_backoff', paused - now) end

local f = factor(state, now, recovery, probe)
local charges = {req = 1, inp = input_cost, out = output_cost}
-- Requests are smoothed (the upstream may enforce a minute's limit second by second); token
-- meters are as deep as the upstream's own buckets, so many large calls fit at once.
local bursts = {req = burst, inp = token_burst, out = token_burst}
local new_tat = {}
local worst, reason = 0, nil
for _, dim in ipairs({'req', 'inp', 'out'}) do
  local limit = effective_limit(state, dim, limits[dim], now, f)
  if limit > 0 then
    local per_unit = 60000 / limit
    local tat = math.max(num(redis.call('HGET', state, 'tat:' .. dim), 0), now)
    local increment = charges[dim] * per_unit
    -- A call larger than the burst still goes once the bucket is full, leaving it in debt;
    -- otherwise a big prompt could never be sent.
    local allowance = math.max(bursts[dim], increment)
    local wait = tat + increment - allowance - now
    if wait > 0.001 then
      if wait > worst then worst, reason = wait, dim end
    else
      new_tat[dim] = tat + increment
    end
  end
end
if reason then
  local names = {req = 'rpm', inp = 'input_tpm', out = 'output_tpm'}
  return refuse(names[reason], worst)
end

redis.call('ZREMRANGEBYSCORE', inflight, '-inf', now)
if max_concurrency > 0 and redis.call('ZCARD', inflight) >= max_concurrency then
  return refuse('concurrency', 50)
end

for dim, tat in pairs(new_tat) do put(state, 'tat:' .. dim, tat) end
redis.call('ZADD', inflight, now + lease, grant)
if mode == 'head' then
  redis.call('ZREM', waiting, job)
  redis.call('HDEL', costs, job)
  -- The priority's clock moves to the job dispatched, and its key's next job stands in line.
  local r = tonumber(rank)
  local clock = num(redis.call('HGET', fair, 'v:' .. r), 0)
  local vtime = tonumber(head_score) - r * 1e13
  if vtime > clock then redis.call('HSET', fair, 'v:' .. r, vtime) end
  local queue = key_queue(r, client_key)
  redis.call('ZREM', queue, job)
  local next_job = redis.call('ZRANGE', queue, 0, 0)[1]
  if next_job then stand_in_line(r, client_key, next_job) end
  if r == 0 and client_key ~= '' then
    if redis.call('HINCRBY', fair, 'h:' .. client_key, -1) <= 0 then
      redis.call('HDEL', fair, 'h:' .. client_key)
    end
  end
end
redis.call('PEXPIRE', state, 86400000)
return {'granted', job, rank, tostring(input_cost), tostring(output_cost)}
