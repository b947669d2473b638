-- Serial heartbeat, fenced: extends the holder's lease.
-- ARGV[1] token, ARGV[2] lease ms. Reply: 1 renewed | 0 not the holder any more
local rec = redis.call('HMGET', KEYS[1], 's', 't')
if rec[1] ~= 'h' or rec[2] ~= ARGV[1] then return 0 end
local lease = tonumber(ARGV[2])
redis.call('PEXPIRE', KEYS[1], lease)
keep(KEYS[4], lease)
return 1
