-- The share of the configured rate in force now, for `promptq limits`.
-- KEYS: 1 state hash. ARGV: 1 recovery ms, 2 probe per ms
return string.format('%.4f', factor(KEYS[1], now_ms(), tonumber(ARGV[1]), tonumber(ARGV[2])))
