-- Room for `adding` more of a key's unfinished jobs in its count.
-- KEYS: 1 the count. ARGV: 1 adding, 2 the quota, 3 the count's lifetime (ms).
-- Returns 1 when added, 0 when the database must count.
return add_within(KEYS[1], ARGV[1], ARGV[2], ARGV[3])
