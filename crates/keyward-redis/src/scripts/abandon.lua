-- Abandon: undoes an idempotency claim or a single-flight lead whose reply never reached
-- the caller (a timeout or a dropped connection), identified by its nonce (field o) since
-- its token is unknown.
-- Sent after the claim on the same connection, so Redis runs it after the claim if the
-- claim ran at all. KEYS[1] record; ARGV[1] nonce, ARGV[2] channel. Reply: 1 undone | 0 not ours
local rec = redis.call('HMGET', KEYS[1], 's', 'o', 'w')
if rec[1] ~= 'h' or rec[2] ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
if rec[3] then redis.call('PUBLISH', ARGV[2], KEYS[1]) end
return 1
