-- Idempotency claim: one decision, one round trip.
-- KEYS[1] record hash {s = 'h'eld | 'c'ompleted, f = fingerprint, t = token, o = claim nonce,
--                     w = waiters, r = response}
-- KEYS[2] fencing counter (same hash tag), see fencing_set.lua
-- ARGV[1] fingerprint (32 bytes), ARGV[2] lease in ms, ARGV[3] counter lifetime in ms,
-- ARGV[4] nonce of this claim (for abandon.lua)
-- Reply: response (a bulk string) completed | {0, token} claimed |
--        {1, holder, lease_left_ms} in flight | {3} mismatch
-- Every call here costs Redis more than the command itself (a replay is ONE call, a claim
-- of a free key five), and every byte a call hands to Lua is hashed there: keep both low.
local rec = redis.call('HMGET', KEYS[1], 's', 'f', 't', 'r')
if rec[1] == 'c' then
  -- The response alone, not in an array: the commonest answer builds no table.
  if rec[2] == ARGV[1] then return rec[4] end
  return {3}
end
if rec[1] == 'h' then
  if rec[2] ~= ARGV[1] then return {3} end
  -- A duplicate saw the claim: its settlement must be published.
  redis.call('HSET', KEYS[1], 'w', '1')
  return {1, rec[3], redis.call('PTTL', KEYS[1])}
end
-- Free (never used, released, or the holder's lease ran out and the record expired).
-- The counter outlives records; the token is above every earlier one even when the
-- counter is gone or older (fencing_set.lua), and the counter lives ARGV[3] from now:
-- with no record left, nothing needs it for longer.
local token = set_next_token(KEYS[2], ARGV[3])
redis.call('HSET', KEYS[1], 's', 'h', 'f', ARGV[1], 't', token, 'o', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return {0, token}
