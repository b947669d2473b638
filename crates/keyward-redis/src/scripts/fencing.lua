-- Fencing tokens (prepended to every script that issues them).
-- next_token(counter): INCR the counter, but never below Redis's clock in microseconds.
-- A counter that comes back older than a token already issued (gone, or an AOF
-- `everysec` crash, or a failover to a replica that had not copied the last INCRs)
-- would otherwise hand out that token again: with the floor, the next token is higher
-- than every earlier one as long as tokens were issued no faster than one per
-- microsecond per key on average (one round trip each, so always) and the clock of the
-- node that answers now is not behind the clock of the one that issued them.
local function next_token(counter)
  local t = redis.call('TIME')
  local floor = tonumber(t[1]) * 1000000 + tonumber(t[2])
  local n = redis.call('INCR', counter)
  if n < floor then
    n = floor
    redis.call('SET', counter, string.format('%d', n), 'KEEPTTL')
  end
  return string.format('%d', n)
end
