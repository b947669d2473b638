-- Permits leave: a waiter gives up (timeout) or is cancelled.
-- ARGV[1] waiter id, ARGV[2] lease ms, ARGV[3] channel, ARGV[4] '1' = pass a permit
-- granted in the meantime on to the next waiter, '0' = keep it, ARGV[5] permits
-- Reply: {0, token} a permit had been granted and is kept | {1} left
local now = now_ms()
local token = granted(ARGV[1], now)
if token then
  if ARGV[4] ~= '1' then return {0, token} end
  redis.call('ZREM', KEYS[1], token)
  promote(now, tonumber(ARGV[2]), tonumber(ARGV[5]), ARGV[3])
  return {1}
end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
return {1}
