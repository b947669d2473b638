-- Permits acquire: take a free permit, queue, or refuse. One decision.
-- ARGV[1] waiter id, ARGV[2] lease ms, ARGV[3] max queue, ARGV[4] max wait ms,
-- ARGV[5] channel, ARGV[6] permits
-- Reply: {0, token} acquired | {1, first lease left ms} queued | {2} queue full | {3} timeout (max wait 0)
local member, lease, channel = ARGV[1], tonumber(ARGV[2]), ARGV[5]
local max_queue, max_wait, permits = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[6])
local now = now_ms()
-- Waiters first (FIFO): after this, a free permit means nobody waits.
promote(now, lease, permits, channel)
if redis.call('ZCARD', KEYS[1]) < permits then
  return {0, hold(now, lease)}
end
if redis.call('ZCARD', KEYS[2]) >= max_queue then
  -- Before refusing, drop waiters that gave up without leaving (their process died).
  for _, m in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
    local deadline = tonumber(redis.call('HGET', KEYS[3], m))
    if not deadline or deadline <= now then
      redis.call('ZREM', KEYS[2], m)
      redis.call('HDEL', KEYS[3], m)
    end
  end
  if redis.call('ZCARD', KEYS[2]) >= max_queue then return {2} end
end
if max_wait <= 0 then return {3} end
local arrival = next_number(lease + max_wait)
redis.call('ZADD', KEYS[2], arrival, member)
redis.call('HSET', KEYS[3], member, string.format('%d', now + max_wait))
keep(KEYS[2], lease + max_wait)
keep(KEYS[3], lease + max_wait)
return {1, lease_left(now)}
