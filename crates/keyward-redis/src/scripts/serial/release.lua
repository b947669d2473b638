-- Serial release, fenced: hands the key to the first live waiter, or frees it.
-- ARGV[1] token, ARGV[2] lease ms, ARGV[3] channel. Reply: 1 released | 0 not the holder
local rec = redis.call('HMGET', KEYS[1], 's', 't')
if rec[1] ~= 'h' or rec[2] ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
promote(now_ms(), tonumber(ARGV[2]), ARGV[3])
return 1
