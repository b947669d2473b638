-- Prototype (not in the store): the claim of today's hash record, token from Redis's
-- clock only, no counter key. Same KEYS/ARGV as idempotency/claim.lua (KEYS[2] unused).
local rec = redis.call('HMGET', KEYS[1], 's', 'f', 't', 'r')
if rec[1] == 'c' then
  if rec[2] == ARGV[1] then return rec[4] end
  return {3}
end
if rec[1] == 'h' then
  if rec[2] ~= ARGV[1] then return {3} end
  redis.call('HSET', KEYS[1], 'w', '1')
  return {1, rec[3], redis.call('PTTL', KEYS[1])}
end
local t = redis.call('TIME')
local token = string.format('%d', tonumber(t[1]) * 1000000 + tonumber(t[2]))
redis.call('HSET', KEYS[1], 's', 'h', 'f', ARGV[1], 't', token, 'o', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return {0, token}
