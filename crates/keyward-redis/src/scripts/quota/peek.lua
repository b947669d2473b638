-- Quota peek: the key's TAT and the clock, writing nothing. The admission of a quota
-- priced by its response: the caller decides with `Quota::decide` and takes nothing.
-- KEYS[1] the key's TAT ("SECONDS.NNNNNNNNN", absent = full bucket), as in check.lua
-- ARGV[1], ARGV[2] optional "now" (seconds, nanos) instead of TIME (tests only)
-- Reply: {1, tat_s, tat_ns, now_s, now_ns} (tat 0 0 = none)
local now_s, now_n
if ARGV[1] then
  now_s, now_n = tonumber(ARGV[1]), tonumber(ARGV[2])
else
  local t = redis.call('TIME')
  now_s, now_n = tonumber(t[1]), tonumber(t[2]) * 1000
end
local tat_s, tat_n = 0, 0
local stored = redis.call('GET', KEYS[1])
if stored then
  local s, n = string.match(stored, '^(%d+)%.(%d+)$')
  if s then tat_s, tat_n = tonumber(s), tonumber(n) end
end
return {1, tat_s, tat_n, now_s, now_n}
