-- Single flight lead: one leader per key across all instances, or a landed response
-- kept for reuse.
-- KEYS[1] record hash {s = 'h', t = token, o = lead nonce, w = watched}, expires with the lease
-- KEYS[2] fencing counter (see fencing.lua)
-- KEYS[3] the response kept for reuse (`record:k`, see publish.lua), expiring with its reuse_for
-- ARGV[1] lease ms, ARGV[2] nonce of this lead (for abandon.lua), ARGV[3] reuse_for ms ('0': none)
-- Reply: {0, token} leader | {1} follower | {2, landing, ms it is kept for yet} reused
if ARGV[3] ~= '0' then
  local kept = redis.call('GET', KEYS[3])
  if kept then return {2, kept, redis.call('PTTL', KEYS[3])} end
end
if redis.call('HGET', KEYS[1], 's') == 'h' then return {1} end
local token = next_token(KEYS[2])
local lease = tonumber(ARGV[1])
if redis.call('PTTL', KEYS[2]) < lease then redis.call('PEXPIRE', KEYS[2], lease) end
redis.call('HSET', KEYS[1], 's', 'h', 't', token, 'o', ARGV[2])
redis.call('PEXPIRE', KEYS[1], lease)
return {0, token}
