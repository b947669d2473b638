-- Before a waiter sleeps: does ARGV[1] still hold the record? If so, flag the record as
-- watched (field w) so its settlement is published. Shared by every layer whose records
-- use the fields s = 'h' (held) and t = token.
-- KEYS[1] record; ARGV[1] holder token. Reply: lease left in ms | -1 settled
local rec = redis.call('HMGET', KEYS[1], 's', 't')
if rec[1] ~= 'h' or rec[2] ~= ARGV[1] then return -1 end
redis.call('HSET', KEYS[1], 'w', '1')
return redis.call('PTTL', KEYS[1])
