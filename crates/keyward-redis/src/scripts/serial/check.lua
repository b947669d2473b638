-- Serial waiter check, after a wake-up: was the key handed to this waiter?
-- ARGV[1] waiter id, ARGV[2] lease ms, ARGV[3] channel
-- Reply: {0, token} acquired | {1, holder lease left ms} still queued | {3} no longer queued
local rec = redis.call('HMGET', KEYS[1], 's', 't', 'g')
if rec[1] == 'h' and rec[3] == ARGV[1] then return {0, rec[2]} end
if rec[1] ~= 'h' then
  -- The holder's lease ran out: the first live waiter takes over.
  local head, token = promote(now_ms(), tonumber(ARGV[2]), ARGV[3])
  if head == ARGV[1] then return {0, token} end
end
if not redis.call('ZSCORE', KEYS[2], ARGV[1]) then return {3} end
return {1, redis.call('PTTL', KEYS[1])}
