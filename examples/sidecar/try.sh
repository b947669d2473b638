#!/usr/bin/env bash
# README "Try the sidecar": what examples/sidecar/payments.toml guarantees, one curl at a
# time. First start, each in a terminal of its own:
#   cargo run -p examples --example upstream                         # demo upstream, :9000
#   cargo run -p keyward-sidecar -- serve -c examples/sidecar/payments.toml  # :8080, admin :9901
# then run `bash examples/sidecar/try.sh` (or paste the lines below) on a fresh sidecar.
# crates/keyward-sidecar/tests/try_sidecar.rs runs this file and checks every answer.
set -u
KEYWARD=${KEYWARD:-http://127.0.0.1:8080}    # the sidecar
ADMIN=${ADMIN:-http://127.0.0.1:9901}        # its admin listener
UPSTREAM=${UPSTREAM:-http://127.0.0.1:9000}  # the demo upstream
ALICE=(-H 'Authorization: Bearer sk_alice' -H 'X-Api-Key: key_alice' -H 'content-type: application/json')
BOB=(-H 'Authorization: Bearer sk_bob' -H 'X-Api-Key: key_bob' -H 'content-type: application/json')

echo '## 1. A payment: 201, the upstream charges once ("effect": 1)'
curl -si -X POST "$KEYWARD/accounts/alice/payments" "${ALICE[@]}" -H 'Idempotency-Key: order-1' -d '{"amount":1000}'; echo

echo '## 2. Its retry: the first response again, Idempotent-Replayed: true, no second charge'
curl -si -X POST "$KEYWARD/accounts/alice/payments" "${ALICE[@]}" -H 'Idempotency-Key: order-1' -d '{"amount":1000}'; echo

echo '## 3. The same key for another payment: 422 idempotency-key-reused'
curl -si -X POST "$KEYWARD/accounts/alice/payments" "${ALICE[@]}" -H 'Idempotency-Key: order-1' -d '{"amount":5}'; echo

echo '## 4. A duplicate while the first is still running (3 s): 409 with Retry-After'
curl -s -o /dev/null -X POST "$KEYWARD/accounts/alice/payments?delay_ms=3000" "${ALICE[@]}" -H 'Idempotency-Key: order-2' -d '{"amount":7}' &
sleep 1
curl -si -X POST "$KEYWARD/accounts/alice/payments?delay_ms=3000" "${ALICE[@]}" -H 'Idempotency-Key: order-2' -d '{"amount":7}'; echo
wait

echo '## 5. Two payments of one account at once: one at a time ("concurrent": 1), each with its fencing token'
curl -s -X POST "$KEYWARD/accounts/alice/payments?delay_ms=500" "${ALICE[@]}" -H 'Idempotency-Key: order-3' -d '{"amount":1}' &
curl -s -X POST "$KEYWARD/accounts/alice/payments?delay_ms=500" "${ALICE[@]}" -H 'Idempotency-Key: order-4' -d '{"amount":2}' &
wait

echo '## 6. Over quota: key_bob may pay 10 times a minute; the 11th gets 429, Retry-After and RateLimit headers'
for i in 1 2 3 4 5 6 7 8 9 10; do
  curl -s -o /dev/null -w '%{http_code} ' -X POST "$KEYWARD/accounts/bob/payments" "${BOB[@]}" -H "Idempotency-Key: bob-$i" -d '{"amount":1}'
done; echo
curl -si -X POST "$KEYWARD/accounts/bob/payments" "${BOB[@]}" -H 'Idempotency-Key: bob-11' -d '{"amount":1}'; echo

echo '## 7. A stampede: 5 identical balance reads at once, one upstream call, 4 copies (Keyward-Coalesced: true)'
for i in 1 2 3 4 5; do
  curl -s -o /dev/null -w '%{http_code} Keyward-Coalesced: %header{keyward-coalesced}\n' "$KEYWARD/accounts/alice/balance?delay_ms=2000" -H 'Authorization: Bearer sk_alice' &
done; wait

echo '## 8. Did it already happen? The admin listener: order-1 "completed" (201), order-9 "absent"'
curl -s "$ADMIN/keys/payments/order-1" -H 'Authorization: Bearer sk_alice'; echo
curl -s "$ADMIN/keys/payments/order-9" -H 'Authorization: Bearer sk_alice'; echo

echo '## 9. Metrics: every decision, per layer, route and outcome'
curl -s "$ADMIN/metrics" | grep '^keyward_decisions_total'

echo '## 10. What the upstream did: order-1 charged once, one payment per account at a time, one balance read'
curl -s "$UPSTREAM/effects"
