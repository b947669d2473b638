-- (after fencing_set.lua and string_record.lua) token from the counter as today.
local token = set_next_token(KEYS[2], ARGV[3])
redis.call('SET', KEYS[1], 'h' .. ARGV[1] .. ARGV[4] .. token, 'PX', ARGV[2])
return {0, token}
