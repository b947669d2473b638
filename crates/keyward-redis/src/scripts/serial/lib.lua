-- Shared by every serial script (prepended to each).
-- KEYS[1] record hash {s = 'h'eld, t = holder token, g = holder's waiter id}; expires with the lease
-- KEYS[2] queue: zset of waiter ids scored by arrival number (FIFO)
-- KEYS[3] deadlines: hash waiter id -> ms (Redis clock) after which the waiter has given up
--         (or its process died): such waiters are skipped and dropped
-- KEYS[4] fencing counter, for tokens and arrival numbers (`next_token`, fencing.lua:
--         never below the clock in microseconds, so both keep increasing)
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

-- Makes waiter `member` the holder with a fresh token.
local function hold(member, lease)
  local token = next_number(lease)
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[1], 's', 'h', 't', token, 'g', member)
  redis.call('PEXPIRE', KEYS[1], lease)
  return token
end

-- Hands the free key to the first live waiter and wakes it; returns its id and token.
local function promote(now, lease, channel)
  while true do
    local head = redis.call('ZRANGE', KEYS[2], 0, 0)[1]
    if not head then return nil end
    redis.call('ZREM', KEYS[2], head)
    local deadline = tonumber(redis.call('HGET', KEYS[3], head))
    redis.call('HDEL', KEYS[3], head)
    if deadline and deadline > now then
      local token = hold(head, lease)
      redis.call('PUBLISH', channel, KEYS[1])
      return head, token
    end
  end
end
