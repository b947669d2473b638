-- Idempotency completion, fenced: only the latest claim's token stores its response.
-- KEYS[1] record, KEYS[2] fencing counter
-- ARGV[1] token, ARGV[2] fingerprint, ARGV[3] encoded response, ARGV[4] ttl in ms, ARGV[5] channel
-- Reply: 1 stored | 0 fenced
local rec = redis.call('HMGET', KEYS[1], 's', 't', 'w')
-- Our own completion already landed (a retry whose first reply was lost): stored.
if rec[1] == 'c' and rec[2] == ARGV[1] then return 1 end
if rec[1] == 'h' then
  if rec[2] ~= ARGV[1] then return 0 end
elseif rec[1] or redis.call('GET', KEYS[2]) ~= ARGV[1] then
  -- Completed already, or claimed by someone after us: a successor's work must win.
  return 0
end
-- Still held by us, or our lease ran out but nobody claimed since (the counter still
-- shows our token): nothing of a successor's can be overwritten.
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 's', 'c', 'f', ARGV[2], 'r', ARGV[3], 't', ARGV[1])
local ttl = tonumber(ARGV[4])
redis.call('PEXPIRE', KEYS[1], ttl)
if redis.call('PTTL', KEYS[2]) < ttl then redis.call('PEXPIRE', KEYS[2], ttl) end
if rec[3] then redis.call('PUBLISH', ARGV[5], KEYS[1]) end
return 1
