-- Single flight follower, after a wake-up: did flight ARGV[1] land?
-- KEYS[1] record, KEYS[2] the flight's landing (`record:l:TOKEN`); ARGV[1] token
-- Reply: {0, landing} landed | {1, lease left ms} still in flight | {2} ended without a
-- landing (failed, abandoned, lease expired)
local landing = redis.call('GET', KEYS[2])
if landing then return {0, landing} end
local rec = redis.call('HMGET', KEYS[1], 's', 't')
if rec[1] == 'h' and rec[2] == ARGV[1] then
  redis.call('HSET', KEYS[1], 'w', '1')
  return {1, redis.call('PTTL', KEYS[1])}
end
return {2}
