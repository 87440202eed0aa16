-- One job's intake: a unit of the key's intake rate and, once that is taken, room for the
-- job in the key's unfinished count, in one round trip.
-- KEYS: 1 the rate's bucket hash, 2 the unfinished count. ARGV: 1 units per minute,
-- 2 burst ms, 3 the unfinished quota, 4 the count's lifetime (ms).
-- Returns {0 when the unit was taken else the ms to wait, 1 when the count took the job}.
local wait = take_unit(KEYS[1], ARGV[1], ARGV[2])
if wait ~= 0 then return {wait, 0} end
return {0, add_within(KEYS[2], 1, ARGV[3], ARGV[4])}
