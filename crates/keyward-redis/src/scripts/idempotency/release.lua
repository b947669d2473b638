-- Idempotency release, fenced: frees the key only if ARGV[1] still holds it.
-- KEYS[1] record; ARGV[1] token, ARGV[2] channel. Reply: 1 released | 0 not the holder
local rec = redis.call('HMGET', KEYS[1], 's', 't', 'w')
if rec[1] ~= 'h' or rec[2] ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
if rec[3] then redis.call('PUBLISH', ARGV[2], KEYS[1]) end
return 1
