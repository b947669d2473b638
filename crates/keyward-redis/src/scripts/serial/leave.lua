-- Serial leave: a waiter gives up (timeout) or is cancelled.
-- ARGV[1] waiter id, ARGV[2] lease ms, ARGV[3] channel, ARGV[4] '1' = pass a grant that
-- raced with leaving on to the next waiter, '0' = keep it
-- Reply: {0, token} the key had been handed over and is kept | {1} left
local rec = redis.call('HMGET', KEYS[1], 's', 't', 'g')
if rec[1] == 'h' and rec[3] == ARGV[1] then
  if ARGV[4] ~= '1' then return {0, rec[2]} end
  redis.call('DEL', KEYS[1])
  promote(now_ms(), tonumber(ARGV[2]), ARGV[3])
  return {1}
end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
return {1}
