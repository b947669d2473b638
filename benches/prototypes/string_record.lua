-- Prototype (not in the store): a single-value record, `<state><fingerprint 32><rest>`;
-- completed: rest = the response (the client strips the first 33 bytes); held: rest =
-- nonce (16) + token. Followed by string_with_counter.lua or string_no_counter.lua.
local v = redis.call('GET', KEYS[1])
if v then
  if string.sub(v, 2, 33) ~= ARGV[1] then return {3} end
  if string.byte(v, 1) == 99 then return v end
  return {1, string.sub(v, 50), redis.call('PTTL', KEYS[1])}
end
