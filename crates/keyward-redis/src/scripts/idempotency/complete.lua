-- Idempotency completion, fenced: only the latest claim's token stores its response.
-- KEYS[1] record, KEYS[2] fencing counter
-- ARGV[1] token, ARGV[2] fingerprint, ARGV[3] encoded response, ARGV[4] ttl in ms, ARGV[5] channel
-- Reply: 1 stored | 0 fenced
local rec = redis.call('HMGET', KEYS[1], 's', 't', 'w')
-- Our own completion already landed (a retry whose first reply was lost): stored.
if rec[1] == 'c' and rec[2] == ARGV[1] then return 1 end
if rec[1] == 'h' then
  if rec[2] ~= ARGV[1] then return 0 end
elseif rec[1] then
  -- Completed already by someone else: their record stays.
  return 0
else
  -- Free: our lease ran out, or our claim was lost (a failover to a replica that had not
  -- copied it). Every claim after ours got a higher token (fencing.lua), so nobody
  -- claimed since unless the counter is above ours (it may be below: lost with the claim).
  local n = tonumber(redis.call('GET', KEYS[2]))
  if n and n > tonumber(ARGV[1]) then return 0 end
end
-- Still held by us, or free with nobody having claimed since: nothing of a successor's
-- can be overwritten. The held record's other fields (o, w) go with it.
if rec[1] then redis.call('DEL', KEYS[1]) end
redis.call('HSET', KEYS[1], 's', 'c', 'f', ARGV[2], 'r', ARGV[3], 't', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
-- The counter lives at least as long as the record (GT: only ever lengthened; a counter
-- always has a lifetime, claims give it one, and a gone one stays gone).
redis.call('PEXPIRE', KEYS[2], ARGV[4], 'GT')
if rec[3] then redis.call('PUBLISH', ARGV[5], KEYS[1]) end
return 1
