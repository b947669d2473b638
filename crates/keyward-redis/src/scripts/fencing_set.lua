-- Fencing tokens in one write (prepended to the scripts that issue a token only when the
-- key has no record, e.g. an idempotency claim of a free key).
-- set_next_token(counter, lifetime_ms): the same token as fencing.lua's next_token,
-- max(INCR counter, Redis TIME in microseconds), with the same floor and the same
-- guarantee, but in one command on the common path: the counter is SET to the floor
-- (with its lifetime, PX) and its previous value read back in the same command (GET).
-- Only when that value is at or above the floor (tokens issued faster than the clock
-- ticks, or a clock behind the one that issued them) is the counter SET again, to that
-- value plus one: the token INCR would have given. A value that is not a number counts as
-- lost, like a counter that is gone (INCR would fail on it forever).
-- The counter's lifetime becomes `lifetime_ms` from now, even if it had more left: only
-- for scripts whose key has no record, so nothing else needs the counter for longer.
local function set_next_token(counter, lifetime_ms)
  local t = redis.call('TIME')
  local floor = tonumber(t[1]) * 1000000 + tonumber(t[2])
  local token = string.format('%d', floor)
  local last = tonumber(redis.call('SET', counter, token, 'PX', lifetime_ms, 'GET'))
  if last and last >= floor then
    token = string.format('%d', last + 1)
    redis.call('SET', counter, token, 'PX', lifetime_ms)
  end
  return token
end
