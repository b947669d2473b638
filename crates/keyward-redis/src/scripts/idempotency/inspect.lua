-- Idempotency inspect: what a record holds, changing nothing (operators' look-ups).
-- KEYS[1] record hash (see claim.lua)
-- Reply: {0} absent | {1, token, pttl_ms, fingerprint} held | {2, response, pttl_ms, fingerprint} completed
local rec = redis.call('HMGET', KEYS[1], 's', 'f', 't', 'r')
if rec[1] == 'c' then return {2, rec[4], redis.call('PTTL', KEYS[1]), rec[2]} end
if rec[1] == 'h' then return {1, rec[3], redis.call('PTTL', KEYS[1]), rec[2]} end
return {0}
