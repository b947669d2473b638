-- Permits waiter check, after a wake-up: was a permit handed to this waiter?
-- ARGV[1] waiter id, ARGV[2] lease ms, ARGV[3] channel, ARGV[4] permits
-- Reply: {0, token} acquired | {1, first lease left ms} still queued | {3} no longer queued
local now = now_ms()
local token = granted(ARGV[1], now)
if token then return {0, token} end
-- A holder's lease ran out: free permits go to the first live waiters.
promote(now, tonumber(ARGV[2]), tonumber(ARGV[4]), ARGV[3])
token = granted(ARGV[1], now)
if token then return {0, token} end
if not redis.call('ZSCORE', KEYS[2], ARGV[1]) then return {3} end
return {1, lease_left(now)}
