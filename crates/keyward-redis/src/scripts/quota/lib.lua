-- What every quota script shares: the clock, the stored TAT, the backlog and the write
-- of a new TAT. Lua numbers are doubles, exact only below 2^53, and nanoseconds since the
-- epoch are above that: every instant and span is a (seconds, nanoseconds) pair, each
-- part exact, so the arithmetic is exact to the nanosecond. The clock's resolution is
-- TIME's, 1 us.
-- The TAT key holds "SECONDS.NNNNNNNNN" (absent = full bucket) and expires when the TAT
-- passes, so idle keys vanish.
local B = 1000000000

-- "now": ARGV[i], ARGV[i + 1] when given (tests only), else Redis TIME.
local function quota_now(i)
  if ARGV[i] then return tonumber(ARGV[i]), tonumber(ARGV[i + 1]) end
  local t = redis.call('TIME')
  return tonumber(t[1]), tonumber(t[2]) * 1000
end

-- The stored TAT, (0, 0) for none.
local function quota_tat(key)
  local stored = redis.call('GET', key)
  if stored then
    local s, n = string.match(stored, '^(%d+)%.(%d+)$')
    if s then return tonumber(s), tonumber(n) end
  end
  return 0, 0
end

-- backlog = max(tat - now, 0)
local function quota_backlog(tat_s, tat_n, now_s, now_n)
  if tat_s > now_s or (tat_s == now_s and tat_n > now_n) then
    local b_s, b_n = tat_s - now_s, tat_n - now_n
    if b_n < 0 then b_s, b_n = b_s - 1, b_n + B end
    return b_s, b_n
  end
  return 0, 0
end

-- Stores the TAT now + delay; `test_clock`: no expiry (a test clock is not Redis's),
-- else it expires once the TAT is in the past (rounded up to the next millisecond).
local function quota_store(key, now_s, now_n, d_s, d_n, test_clock)
  local n_s, n_n = now_s + d_s, now_n + d_n
  if n_n >= B then n_s, n_n = n_s + 1, n_n - B end
  local value = string.format('%d.%09d', n_s, n_n)
  if test_clock then
    redis.call('SET', key, value)
  else
    redis.call('SET', key, value, 'PX', d_s * 1000 + math.ceil(d_n / 1000000))
  end
end
