-- (after string_record.lua) token from Redis's clock only: one key, one write.
local t = redis.call('TIME')
local token = string.format('%d', tonumber(t[1]) * 1000000 + tonumber(t[2]))
redis.call('SET', KEYS[1], 'h' .. ARGV[1] .. ARGV[4] .. token, 'PX', ARGV[2])
return {0, token}
