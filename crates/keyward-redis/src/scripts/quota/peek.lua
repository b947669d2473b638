-- Quota peek: the key's TAT and the clock, writing nothing. The admission of a quota
-- priced by its response: the caller decides with `Quota::decide` and takes nothing.
-- KEYS[1] the key's TAT (lib.lua)
-- ARGV[1], ARGV[2] optional "now" (seconds, nanos) instead of TIME (tests only)
-- Reply: {1, tat_s, tat_ns, now_s, now_ns} (tat 0 0 = none)
local now_s, now_n = quota_now(1)
local tat_s, tat_n = quota_tat(KEYS[1])
return {1, tat_s, tat_n, now_s, now_n}
