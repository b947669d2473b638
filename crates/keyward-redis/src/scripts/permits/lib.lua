-- Shared by every permits script (prepended to each): the per-key semaphore of
-- `PerKeySerialLayer::permits(N)` with N > 1. (N = 1 runs the serial scripts.)
-- KEYS[1] holders: zset token -> its lease deadline (ms, Redis clock); a holder whose
--         deadline passed has crashed or hung: its permit is free again
-- KEYS[2] queue: zset of waiter ids scored by arrival number (FIFO)
-- KEYS[3] deadlines: hash waiter id -> ms after which the waiter has given up
-- KEYS[4] fencing counter (`next_token`, fencing.lua), shared with the serial scripts
-- KEYS[5] grants: hash waiter id -> token, for queued waiters a release let in
-- Numbers sent to Redis go through string.format('%d'): Lua would print 1.7e15 as %.14g.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function keep(key, ms)
  if redis.call('PTTL', key) < ms then redis.call('PEXPIRE', key, ms) end
end

local function next_number(keep_ms)
  local n = next_token(KEYS[4])
  keep(KEYS[4], keep_ms)
  return n
end

-- Whether `token` holds a permit now.
local function holds(token, now)
  local deadline = tonumber(redis.call('ZSCORE', KEYS[1], token))
  return deadline ~= nil and deadline > now
end

-- A new holder with a fresh token and a lease.
local function hold(now, lease)
  local token = next_number(lease)
  redis.call('ZADD', KEYS[1], string.format('%d', now + lease), token)
  keep(KEYS[1], lease)
  return token
end

-- Frees the permits of holders whose lease ran out, then hands every free permit to
-- the first live waiters (FIFO) and wakes them.
local function promote(now, lease, permits, channel)
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%d', now))
  local granted = false
  while redis.call('ZCARD', KEYS[1]) < permits do
    local head = redis.call('ZRANGE', KEYS[2], 0, 0)[1]
    if not head then break end
    redis.call('ZREM', KEYS[2], head)
    local deadline = tonumber(redis.call('HGET', KEYS[3], head))
    redis.call('HDEL', KEYS[3], head)
    if deadline and deadline > now then
      redis.call('HSET', KEYS[5], head, hold(now, lease))
      keep(KEYS[5], lease)
      granted = true
    end
  end
  if granted then redis.call('PUBLISH', channel, KEYS[1]) end
end

-- ms until the first holder's lease ends: when a permit may come back by expiry.
local function lease_left(now)
  local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  if not first[2] then return 0 end
  return tonumber(first[2]) - now
end

-- The token granted to waiter `member`, taken out of the grants, if it still holds.
local function granted(member, now)
  local token = redis.call('HGET', KEYS[5], member)
  if not token then return nil end
  redis.call('HDEL', KEYS[5], member)
  if holds(token, now) then return token end
  return nil
end
