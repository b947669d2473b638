-- Idempotency forget (operators' DELETE /keys): deletes a completed record or frees a
-- held claim, fenced. Reply: what the record was, as inspect.lua answers it.
-- KEYS[1] record hash (see claim.lua), KEYS[2] fencing counter (same hash tag)
-- ARGV[1] counter lifetime in ms, ARGV[2] channel
-- A freed holder that comes back finds the record gone; complete.lua then stores only
-- while the counter is not above its token. Taking a token here puts it above, so that
-- holder is fenced (renew.lua already refuses it: the record is not its claim).
local rec = redis.call('HMGET', KEYS[1], 's', 'f', 't', 'r', 'w')
if rec[1] ~= 'c' and rec[1] ~= 'h' then return {0} end
local reply
if rec[1] == 'c' then
  reply = {2, rec[4], redis.call('PTTL', KEYS[1]), rec[2]}
else
  reply = {1, rec[3], redis.call('PTTL', KEYS[1]), rec[2]}
  next_token(KEYS[2])
  local keep = tonumber(ARGV[1])
  if redis.call('PTTL', KEYS[2]) < keep then redis.call('PEXPIRE', KEYS[2], keep) end
end
redis.call('DEL', KEYS[1])
-- Duplicates waiting on the holder claim again and find the key free.
if rec[5] then redis.call('PUBLISH', ARGV[2], KEYS[1]) end
return reply
