-- Permits release, fenced: frees the holder's permit and hands it to the first live
-- waiter. ARGV[1] token, ARGV[2] lease ms, ARGV[3] channel, ARGV[4] permits.
-- Reply: 1 released | 0 not a holder (any more)
local now = now_ms()
if not holds(ARGV[1], now) then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
promote(now, tonumber(ARGV[2]), tonumber(ARGV[4]), ARGV[3])
return 1
