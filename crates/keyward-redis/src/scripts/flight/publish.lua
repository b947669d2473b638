-- Single flight landing, fenced: ends the flight of ARGV[1] and, if followers on other
-- instances watch it, keeps the landing for them and wakes them; a response landing may
-- also be kept for reuse.
-- KEYS[1] record, KEYS[2] this flight's landing (`record:l:TOKEN`), expiring shortly,
-- KEYS[3] the response kept for reuse (`record:k`)
-- ARGV[1] token, ARGV[2] landing ('' = failed: nothing is kept, followers see no landing),
-- ARGV[3] landing ttl ms, ARGV[4] channel, ARGV[5] reuse ms ('0': not kept for reuse).
-- Reply: 1 landed | 0 not the leader any more
local rec = redis.call('HMGET', KEYS[1], 's', 't', 'w')
if rec[1] ~= 'h' or rec[2] ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
if ARGV[5] ~= '0' and string.sub(ARGV[2], 1, 1) == 'R' then
  redis.call('SET', KEYS[3], ARGV[2], 'PX', tonumber(ARGV[5]))
end
if rec[3] then
  if ARGV[2] ~= '' then
    redis.call('SET', KEYS[2], ARGV[2], 'PX', tonumber(ARGV[3]))
  end
  redis.call('PUBLISH', ARGV[4], KEYS[1])
end
return 1
