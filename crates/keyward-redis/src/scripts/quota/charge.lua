-- Quota charge: takes units whether or not they fit, the steps of `Quota::charge`
-- (keyward-core gcra.rs): the key may go into debt (a TAT beyond now + tolerance), and
-- its next requests are limited until the debt is paid back. Exact pairs (lib.lua).
-- KEYS[1] the key's TAT (lib.lua)
-- ARGV[1], ARGV[2] increment = emission interval x cost, saturated (seconds, nanos)
-- ARGV[3], ARGV[4] the largest debt: `MAX_TOLERANCE` (seconds, nanos)
-- ARGV[5], ARGV[6] optional "now" (seconds, nanos) instead of TIME (tests only)
-- Reply: {1, tat_s, tat_ns, now_s, now_ns}: the TAT BEFORE this charge (0 0 = none) and
--        the clock, so the caller reports with `Quota::charge` itself.
local now_s, now_n = quota_now(5)
local tat_s, tat_n = quota_tat(KEYS[1])
local reply = {1, tat_s, tat_n, now_s, now_n}
local b_s, b_n = quota_backlog(tat_s, tat_n, now_s, now_n)
-- delay = min(backlog + increment, max(largest debt, backlog))
local d_s, d_n = b_s + tonumber(ARGV[1]), b_n + tonumber(ARGV[2])
if d_n >= B then d_s, d_n = d_s + 1, d_n - B end
local c_s, c_n = tonumber(ARGV[3]), tonumber(ARGV[4])
if b_s > c_s or (b_s == c_s and b_n > c_n) then c_s, c_n = b_s, b_n end
if d_s > c_s or (d_s == c_s and d_n > c_n) then d_s, d_n = c_s, c_n end
-- A delay of zero is a full bucket: nothing to store.
if d_s > 0 or d_n > 0 then
  quota_store(KEYS[1], now_s, now_n, d_s, d_n, ARGV[5])
end
return reply
