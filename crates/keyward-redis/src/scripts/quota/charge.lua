-- Quota charge: takes units whether or not they fit, the steps of `Quota::charge`
-- (keyward-core gcra.rs): the key may go into debt (a TAT beyond now + tolerance), and
-- its next requests are limited until the debt is paid back. Exact (seconds, nanoseconds)
-- pairs as in check.lua.
-- KEYS[1] the key's TAT ("SECONDS.NNNNNNNNN", absent = full bucket); expires when it passes
-- ARGV[1], ARGV[2] increment = emission interval x cost, saturated (seconds, nanos)
-- ARGV[3], ARGV[4] the largest debt: `MAX_TOLERANCE` (seconds, nanos)
-- ARGV[5], ARGV[6] optional "now" (seconds, nanos) instead of TIME (tests only)
-- Reply: {1, tat_s, tat_ns, now_s, now_ns}: the TAT BEFORE this charge (0 0 = none) and
--        the clock, so the caller reports with `Quota::charge` itself.
local B = 1000000000
local now_s, now_n
if ARGV[5] then
  now_s, now_n = tonumber(ARGV[5]), tonumber(ARGV[6])
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
local reply = {1, tat_s, tat_n, now_s, now_n}
-- backlog = max(tat - now, 0)
local b_s, b_n = 0, 0
if tat_s > now_s or (tat_s == now_s and tat_n > now_n) then
  b_s, b_n = tat_s - now_s, tat_n - now_n
  if b_n < 0 then b_s, b_n = b_s - 1, b_n + B end
end
-- delay = min(backlog + increment, max(largest debt, backlog))
local d_s, d_n = b_s + tonumber(ARGV[1]), b_n + tonumber(ARGV[2])
if d_n >= B then d_s, d_n = d_s + 1, d_n - B end
local c_s, c_n = tonumber(ARGV[3]), tonumber(ARGV[4])
if b_s > c_s or (b_s == c_s and b_n > c_n) then c_s, c_n = b_s, b_n end
if d_s > c_s or (d_s == c_s and d_n > c_n) then d_s, d_n = c_s, c_n end
-- A delay of zero is a full bucket: nothing to store.
if d_s > 0 or d_n > 0 then
  local n_s, n_n = now_s + d_s, now_n + d_n
  if n_n >= B then n_s, n_n = n_s + 1, n_n - B end
  local value = string.format('%d.%09d', n_s, n_n)
  if ARGV[5] then
    redis.call('SET', KEYS[1], value)
  else
    redis.call('SET', KEYS[1], value, 'PX', d_s * 1000 + math.ceil(d_n / 1000000))
  end
end
return reply
