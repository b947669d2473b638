-- Quota: one GCRA decision, the steps of `Quota::decide` (keyward-core gcra.rs), with
-- Redis TIME as the clock.
-- Lua numbers are doubles, exact only below 2^53, and nanoseconds since the epoch are
-- above that: every instant and span is a (seconds, nanoseconds) pair, each part exact,
-- so the arithmetic is exact to the nanosecond. The clock's resolution is TIME's, 1 us.
-- KEYS[1] the key's TAT: a string "SECONDS.NNNNNNNNN" (absent = full bucket); it expires
--         when the TAT passes, so idle keys vanish.
-- ARGV[1], ARGV[2] increment = emission interval x cost (seconds, nanos); nanos -1 =
--         the multiplication overflowed 64 bits: refuse
-- ARGV[3], ARGV[4] tolerance (seconds, nanos)
-- ARGV[5], ARGV[6] optional "now" (seconds, nanos) instead of TIME (tests only)
-- Reply: {allowed 1|0, tat_s, tat_ns, now_s, now_ns}: the TAT BEFORE this decision (0 0
--        = none) and the clock, so the caller computes the reported numbers with
--        `Quota::decide` itself.
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
local reply = {0, tat_s, tat_n, now_s, now_n}
-- backlog = max(tat - now, 0)
local b_s, b_n = 0, 0
if tat_s > now_s or (tat_s == now_s and tat_n > now_n) then
  b_s, b_n = tat_s - now_s, tat_n - now_n
  if b_n < 0 then b_s, b_n = b_s - 1, b_n + B end
end
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
  local n_s, n_n = now_s + d_s, now_n + d_n
  if n_n >= B then n_s, n_n = n_s + 1, n_n - B end
  local value = string.format('%d.%09d', n_s, n_n)
  if ARGV[5] then
    -- A test clock is not Redis's: no expiry on it.
    redis.call('SET', KEYS[1], value)
  else
    -- Expires once the new TAT is in the past (rounded up to the next millisecond).
    redis.call('SET', KEYS[1], value, 'PX', d_s * 1000 + math.ceil(d_n / 1000000))
  end
end
return reply
