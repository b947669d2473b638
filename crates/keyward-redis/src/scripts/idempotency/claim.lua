-- Idempotency claim: one decision, one round trip.
-- KEYS[1] record hash {s = 'h'eld | 'c'ompleted, f = fingerprint, t = token, o = claim nonce,
--                     w = waiters, r = response}
-- KEYS[2] fencing counter (same hash tag), see fencing.lua
-- ARGV[1] fingerprint (32 bytes), ARGV[2] lease in ms, ARGV[3] counter lifetime in ms,
-- ARGV[4] nonce of this claim (for abandon.lua)
-- Reply: {0, token} claimed | {1, holder, lease_left_ms} in flight | {2, response} completed | {3} mismatch
local rec = redis.call('HMGET', KEYS[1], 's', 'f', 't', 'r')
if rec[1] == 'c' then
  if rec[2] == ARGV[1] then return {2, rec[4]} end
  return {3}
end
if rec[1] == 'h' then
  if rec[2] ~= ARGV[1] then return {3} end
  -- A duplicate saw the claim: its settlement must be published.
  redis.call('HSET', KEYS[1], 'w', '1')
  return {1, rec[3], redis.call('PTTL', KEYS[1])}
end
-- Free (never used, released, or the holder's lease ran out and the record expired).
-- The counter outlives records; `next_token` keeps tokens above every earlier one even
-- when the counter is gone or older (see fencing.lua).
local keep = tonumber(ARGV[3])
local token = next_token(KEYS[2])
if redis.call('PTTL', KEYS[2]) < keep then redis.call('PEXPIRE', KEYS[2], keep) end
redis.call('HSET', KEYS[1], 's', 'h', 'f', ARGV[1], 't', token, 'o', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return {0, token}
