-- Permits heartbeat, fenced: extends the holder's lease.
-- ARGV[1] token, ARGV[2] lease ms. Reply: 1 renewed | 0 not a holder any more
local now = now_ms()
if not holds(ARGV[1], now) then return 0 end
local lease = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], 'XX', string.format('%d', now + lease), ARGV[1])
keep(KEYS[1], lease)
keep(KEYS[4], lease)
return 1
