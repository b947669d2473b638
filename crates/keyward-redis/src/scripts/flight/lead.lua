-- Single flight lead: one leader per key across all instances.
-- KEYS[1] record hash {s = 'h', t = token, w = watched}, expires with the lease
-- KEYS[2] fencing counter (restarts from the clock in microseconds when gone)
-- ARGV[1] lease ms. Reply: {0, token} leader | {1} follower
if redis.call('HGET', KEYS[1], 's') == 'h' then return {1} end
if redis.call('EXISTS', KEYS[2]) == 0 then
  local now = redis.call('TIME')
  redis.call('SET', KEYS[2], now[1] .. string.format('%06d', tonumber(now[2])))
end
local token = string.format('%d', redis.call('INCR', KEYS[2]))
local lease = tonumber(ARGV[1])
if redis.call('PTTL', KEYS[2]) < lease then redis.call('PEXPIRE', KEYS[2], lease) end
redis.call('HSET', KEYS[1], 's', 'h', 't', token)
redis.call('PEXPIRE', KEYS[1], lease)
return {0, token}
