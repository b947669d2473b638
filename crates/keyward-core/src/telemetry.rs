//! Span, field, metric and outcome names. They are stable: dashboards and alerts depend on
//! these exact strings.

/// Span of an `IdempotencyLayer` decision.
pub const SPAN_IDEMPOTENCY: &str = "keyward.idempotency";
/// Span of a `QuotaLayer` decision.
pub const SPAN_QUOTA: &str = "keyward.quota";
/// Span of a `PerKeySerialLayer` decision.
pub const SPAN_SERIAL: &str = "keyward.serial";
/// Span of a `SingleFlightLayer` decision.
pub const SPAN_SINGLE_FLIGHT: &str = "keyward.single_flight";

/// Span field: the route name.
pub const FIELD_ROUTE: &str = "keyward.route";
/// Span field: [`crate::KeyHash`] of the key.
pub const FIELD_KEY_HASH: &str = "keyward.key_hash";
/// Span field: the decision's outcome (see the outcome enums).
pub const FIELD_OUTCOME: &str = "keyward.outcome";
/// Span field: seconds spent waiting (for a lock, an in-flight request, a leader).
pub const FIELD_WAIT_SECONDS: &str = "keyward.wait_seconds";
/// Span field: the fencing token issued to the request.
pub const FIELD_FENCING_TOKEN: &str = "keyward.fencing_token";
/// Span field of a single-flight follower: the trace id (32 hex digits) of the leader
/// whose response it received. Recorded with the `keyward` crate's `opentelemetry`
/// feature, which also links the follower's span to the leader's.
pub const FIELD_LEADER_TRACE_ID: &str = "keyward.leader_trace_id";

/// Counter `{layer, route, outcome}`: one per decision, with the outcome its span records.
pub const METRIC_DECISIONS: &str = "keyward_decisions_total";
/// Histogram `{layer, route}`, seconds: how long a request waited for its key (a serial
/// turn, an in-flight duplicate, a single-flight leader); recorded where the span records
/// `keyward.wait_seconds`.
pub const METRIC_WAIT_SECONDS: &str = "keyward_wait_seconds";
/// Histogram `{op}`, seconds: one store call that decides, named after the store trait
/// method (see the `STORE_OP_*` constants). Calls that block on other requests (serial
/// `acquire`, idempotency `wait_settled`, single-flight `wait`) count as waits instead.
pub const METRIC_STORE_SECONDS: &str = "keyward_store_seconds";
/// Counter `{op, error}`: store calls that failed, by operation (the `STORE_OP_*`
/// constants, and `acquire` for serial) and `error` (`timeout`, `unavailable`,
/// `corrupt`).
pub const METRIC_STORE_ERRORS: &str = "keyward_store_errors_total";
/// Counter `{layer, route}`: requests let through uncoordinated because the store failed
/// and the layer's `on_store_error` is `Open`.
pub const METRIC_FAIL_OPEN: &str = "keyward_fail_open_total";
/// Gauge (an up-down counter) `{layer, route}`: requests waiting right now, for a
/// serial turn (the queue depth) or as single-flight followers for a leader's answer.
pub const METRIC_WAITING: &str = "keyward_waiting";
/// Store operation of serial's acquire, for [`METRIC_STORE_ERRORS`] (its latency counts
/// as a wait).
pub const STORE_OP_ACQUIRE: &str = "acquire";
/// Metric attribute: why a store call failed.
pub const ATTR_ERROR: &str = "error";

/// Metric attribute: the layer (`idempotency`, `quota`, `serial`, `single_flight`).
pub const ATTR_LAYER: &str = "layer";
/// Metric attribute: the route name.
pub const ATTR_ROUTE: &str = "route";
/// Metric attribute: the decision's outcome.
pub const ATTR_OUTCOME: &str = "outcome";
/// Metric attribute: the store operation.
pub const ATTR_OP: &str = "op";

/// `layer` of `IdempotencyLayer` decisions.
pub const LAYER_IDEMPOTENCY: &str = "idempotency";
/// `layer` of `QuotaLayer` decisions.
pub const LAYER_QUOTA: &str = "quota";
/// `layer` of `PerKeySerialLayer` decisions.
pub const LAYER_SERIAL: &str = "serial";
/// `layer` of `SingleFlightLayer` decisions.
pub const LAYER_SINGLE_FLIGHT: &str = "single_flight";

/// `op` of `IdempotencyStore::claim`.
pub const STORE_OP_CLAIM: &str = "claim";
/// `op` of `IdempotencyStore::complete`.
pub const STORE_OP_COMPLETE: &str = "complete";
/// `op` of `IdempotencyStore::release`.
pub const STORE_OP_RELEASE: &str = "release";
/// `op` of `QuotaStore::check`.
pub const STORE_OP_CHECK: &str = "check";
/// `op` of `SingleFlightStore::lead`.
pub const STORE_OP_LEAD: &str = "lead";
/// `op` of `SingleFlightStore::publish`.
pub const STORE_OP_PUBLISH: &str = "publish";

/// Outcome of any layer whose store failed.
pub const OUTCOME_STORE_ERROR: &str = "store_error";

macro_rules! outcomes {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident => $text:literal,)* }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vmeta])* $variant,)*
            /// The store failed (with `on_error = "open"` the request went through
            /// uncoordinated; with `"closed"` it was answered 503).
            StoreError,
        }

        impl $name {
            /// The contract's name of this outcome.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)*
                    $name::StoreError => OUTCOME_STORE_ERROR,
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

outcomes! {
    /// Outcomes of `keyward.idempotency`.
    IdempotencyOutcome {
        /// First request: the handler ran and its response was stored.
        Executed => "executed",
        /// A stored response was replayed.
        Replayed => "replayed",
        /// Another request holds the key: 409 (or waited and still in flight).
        InFlight => "in_flight",
        /// Same key, different request: 422.
        Mismatch => "mismatch",
        /// No key (400 where required, else passed through uncoordinated).
        MissingKey => "missing_key",
        /// Malformed key: 400.
        InvalidKey => "invalid_key",
        /// The handler ran but its result is not stored (5xx, 408, 425, 429, error,
        /// oversized response, lost lease): the key is free for a retry.
        Released => "released",
        /// The outcome upstream is unknown (transport error or timeout): key released.
        Ambiguous => "ambiguous",
    }
}

outcomes! {
    /// Outcomes of `keyward.quota`.
    QuotaOutcome {
        /// Within quota.
        Allowed => "allowed",
        /// Over quota: 429.
        Limited => "limited",
        /// Over quota in shadow mode: let through, counted.
        ShadowLimited => "shadow_limited",
    }
}

outcomes! {
    /// Outcomes of `keyward.serial`.
    SerialOutcome {
        /// The request got the key's turn.
        Acquired => "acquired",
        /// Waited longer than `max_wait`: 503.
        Timeout => "timeout",
        /// Too many waiters: 503.
        QueueFull => "queue_full",
    }
}

outcomes! {
    /// Outcomes of `keyward.single_flight`.
    SingleFlightOutcome {
        /// This request made the inner call.
        Leader => "leader",
        /// This request received a copy of the leader's response.
        Follower => "follower",
        /// The leader failed and this request got 502.
        LeaderFailed => "leader_failed",
    }
}
