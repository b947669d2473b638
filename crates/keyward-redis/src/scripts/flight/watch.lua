-- Single flight follower, before it sleeps: which flight is in progress? Flags the record
-- as watched so that its landing is kept and published.
-- KEYS[1] record. Reply: {token, lease left ms} | {-1} no flight in progress
local rec = redis.call('HMGET', KEYS[1], 's', 't')
if rec[1] ~= 'h' then return {-1} end
redis.call('HSET', KEYS[1], 'w', '1')
return {rec[2], redis.call('PTTL', KEYS[1])}
