-- Idempotency lease renewal, fenced.
-- KEYS[1] record, KEYS[2] fencing counter
-- ARGV[1] token, ARGV[2] lease in ms, ARGV[3] counter lifetime in ms
-- Reply: 1 renewed | 0 not the holder any more
local rec = redis.call('HMGET', KEYS[1], 's', 't')
if rec[1] ~= 'h' or rec[2] ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
-- GT: the counter's lifetime is only ever lengthened (see complete.lua).
redis.call('PEXPIRE', KEYS[2], ARGV[3], 'GT')
return 1
