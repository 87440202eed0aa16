-- A rate that refuses instead of queueing: take one unit of a key's quota now, or say how
-- long until one is free.
-- KEYS: 1 the bucket hash. ARGV: 1 units per minute, 2 burst ms
-- Returns 0 when taken, else the ms to wait.
return take_unit(KEYS[1], ARGV[1], ARGV[2])
