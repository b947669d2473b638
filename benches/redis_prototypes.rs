//! Throwaway prototypes of other claim designs (issue 14), measured beside `GET` and the
//! store's own claim in the paired bench (`KEYWARD_BENCH_SET=prototypes`). None of them is
//! in the store: each one trades a correctness property or the record format of the
//! previous release for Redis CPU (see `benches/results/redis.md`). They run on the bare
//! connection with the store's key names, lease and counter lifetime, so Redis does the
//! same keyspace work as for a real claim; only the client side differs (no store).

use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering};

use redis::aio::ConnectionManager;
use redis::{Script, Value};

const LEASE_MS: &str = "5000";
const COUNTER_LIFETIME_MS: &str = "86400000";
const FINGERPRINT: [u8; 32] = [b'F'; 32];
const NONCE: [u8; 16] = [b'N'; 16];

/// The store's claim script as it is, for a same-connection comparison.
static CURRENT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        "#!lua\n",
        include_str!("../crates/keyward-redis/src/scripts/fencing_set.lua"),
        include_str!("../crates/keyward-redis/src/scripts/idempotency/claim.lua")
    ))
});

/// Hash record as today, token from Redis's clock only: no counter key.
static HASH_NO_COUNTER: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        "#!lua\n",
        include_str!("prototypes/hash_no_counter.lua")
    ))
});

/// Single-value record, token from the counter as today (`fencing_set.lua`).
static STRING_WITH_COUNTER: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        "#!lua\n",
        include_str!("../crates/keyward-redis/src/scripts/fencing_set.lua"),
        include_str!("prototypes/string_record.lua"),
        include_str!("prototypes/string_with_counter.lua")
    ))
});

/// Single-value record, token from Redis's clock only: one key, one write.
static STRING_NO_COUNTER: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        "#!lua\n",
        include_str!("prototypes/string_record.lua"),
        include_str!("prototypes/string_no_counter.lua")
    ))
});

/// The current claim as a Redis 7 function (`FCALL`), same body.
fn function_library() -> String {
    format!(
        "#!lua name=kwproto\n{}\nredis.register_function('claim', function(KEYS, ARGV)\n{}\nend)\n",
        include_str!("../crates/keyward-redis/src/scripts/fencing_set.lua"),
        include_str!("../crates/keyward-redis/src/scripts/idempotency/claim.lua")
    )
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    /// The store's claim script on the bare connection (no store client code).
    CurrentScript,
    /// The same as a function.
    Fcall,
    HashNoCounter,
    StringWithCounter,
    StringNoCounter,
    /// Lua-free: `SET rec <held value> NX PX lease GET`, no token at all.
    SetNxGet,
}

pub struct Protos {
    conn: ConnectionManager,
    next: AtomicU64,
}

fn record(name: &str) -> String {
    format!("keyward:idem:bench:{{{name}}}")
}

impl Protos {
    /// Loads the scripts and stores one completed 256-byte response per record format.
    pub async fn start(conn: ConnectionManager) -> Protos {
        let mut c = conn.clone();
        for script in [
            &CURRENT,
            &HASH_NO_COUNTER,
            &STRING_WITH_COUNTER,
            &STRING_NO_COUNTER,
        ] {
            script.load_async(&mut c).await.expect("load");
        }
        let _: String = redis::cmd("FUNCTION")
            .arg("LOAD")
            .arg("REPLACE")
            .arg(function_library())
            .query_async(&mut c)
            .await
            .expect("function load");
        let response = vec![b'x'; 256];
        let () = redis::cmd("HSET")
            .arg(record("proto-replay-hash"))
            .arg("s")
            .arg("c")
            .arg("f")
            .arg(&FINGERPRINT[..])
            .arg("t")
            .arg("1")
            .arg("r")
            .arg(&response)
            .query_async(&mut c)
            .await
            .expect("hset");
        let mut value = vec![b'c'];
        value.extend_from_slice(&FINGERPRINT);
        value.extend_from_slice(&response);
        let () = redis::cmd("SET")
            .arg(record("proto-replay-string"))
            .arg(value)
            .query_async(&mut c)
            .await
            .expect("set");
        Protos {
            conn,
            next: AtomicU64::new(0),
        }
    }

    /// One claim of `proto`; `replay`: of the completed record, else of a new key.
    pub async fn claim(&self, proto: Proto, replay: bool) {
        let string_format = matches!(
            proto,
            Proto::StringWithCounter | Proto::StringNoCounter | Proto::SetNxGet
        );
        let rec = if replay {
            record(if string_format {
                "proto-replay-string"
            } else {
                "proto-replay-hash"
            })
        } else {
            let n = self.next.fetch_add(1, Ordering::Relaxed);
            record(&format!("proto-{n}"))
        };
        let counter = format!("{rec}:n");
        let mut conn = self.conn.clone();
        let value: Value = match proto {
            Proto::SetNxGet => {
                let mut held = vec![b'h'];
                held.extend_from_slice(&FINGERPRINT);
                held.extend_from_slice(&NONCE);
                redis::cmd("SET")
                    .arg(&rec)
                    .arg(held)
                    .arg("NX")
                    .arg("PX")
                    .arg(LEASE_MS)
                    .arg("GET")
                    .query_async(&mut conn)
                    .await
                    .expect("set nx get")
            }
            Proto::Fcall => redis::cmd("FCALL")
                .arg("claim")
                .arg(2)
                .arg(&rec)
                .arg(&counter)
                .arg(&FINGERPRINT[..])
                .arg(LEASE_MS)
                .arg(COUNTER_LIFETIME_MS)
                .arg(&NONCE[..])
                .query_async(&mut conn)
                .await
                .expect("fcall"),
            _ => {
                let script: &Script = match proto {
                    Proto::CurrentScript => &CURRENT,
                    Proto::HashNoCounter => &HASH_NO_COUNTER,
                    Proto::StringWithCounter => &STRING_WITH_COUNTER,
                    _ => &STRING_NO_COUNTER,
                };
                script
                    .key(&rec)
                    .key(&counter)
                    .arg(&FINGERPRINT[..])
                    .arg(LEASE_MS)
                    .arg(COUNTER_LIFETIME_MS)
                    .arg(&NONCE[..])
                    .invoke_async(&mut conn)
                    .await
                    .expect("evalsha")
            }
        };
        match (replay, &value) {
            (true, Value::BulkString(v)) => assert!(v.len() >= 256, "{proto:?}"),
            (false, Value::Array(items)) => {
                assert_eq!(items.first(), Some(&Value::Int(0)), "{proto:?}")
            }
            (false, Value::Nil) if proto == Proto::SetNxGet => {}
            other => panic!("{proto:?}: {other:?}"),
        }
    }
}
