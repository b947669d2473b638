-- Quota: one GCRA decision, the steps of `Quota::decide` (keyward-core gcra.rs), with
-- Redis TIME as the clock; instants and spans as exact pairs (lib.lua).
-- KEYS[1] the key's TAT (lib.lua)
-- ARGV[1], ARGV[2] increment = emission interval x cost (seconds, nanos); nanos -1 =
--         the multiplication overflowed 64 bits: refuse
-- ARGV[3], ARGV[4] tolerance (seconds, nanos)
-- ARGV[5], ARGV[6] optional "now" (seconds, nanos) instead of TIME (tests only)
-- Reply: {allowed 1|0, tat_s, tat_ns, now_s, now_ns}: the TAT BEFORE this decision (0 0
--        = none) and the clock, so the caller computes the reported numbers with
--        `Quota::decide` itself.
local now_s, now_n = quota_now(5)
local tat_s, tat_n = quota_tat(KEYS[1])
local reply = {0, tat_s, tat_n, now_s, now_n}
local b_s, b_n = quota_backlog(tat_s, tat_n, now_s, now_n)
local inc_s, inc_n = tonumber(ARGV[1]), tonumber(ARGV[2])
if inc_n < 0 then return reply end
-- delay = backlog + increment; allowed iff delay <= tolerance
local d_s, d_n = b_s + inc_s, b_n + inc_n
if d_n >= B then d_s, d_n = d_s + 1, d_n - B end
local tau_s, tau_n = tonumber(ARGV[3]), tonumber(ARGV[4])
if d_s > tau_s or (d_s == tau_s and d_n > tau_n) then return reply end
reply[1] = 1
-- A zero increment leaves the TAT as it is; a delay of zero is a full bucket.
if (inc_s > 0 or inc_n > 0) and (d_s > 0 or d_n > 0) then
  quota_store(KEYS[1], now_s, now_n, d_s, d_n, ARGV[5])
end
return reply
