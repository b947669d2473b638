//! How the layers' points reach their instruments: through handles bound to their
//! attributes (feature `bound-instruments`), or with the attributes on every call.
//!
//! A layer's attribute sets are few: its `layer` and `route` labels, with one outcome
//! or store operation out of a small fixed set of `&'static str`s. Bound
//! (`opentelemetry`'s `experimental_metrics_bound_instruments`), each set is looked up
//! once, on the first point it records, instead of hashed on every request; the
//! feature also enables the SDK's implementation of binding (the API's default binds a
//! no-op, which a meter provider of one's own must override). Without the feature the
//! same points are recorded unbound: the same series either way.

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram, UpDownCounter};

#[cfg(feature = "bound-instruments")]
pub(crate) use bound_handles::Bound;
#[cfg(not(feature = "bound-instruments"))]
pub(crate) use unbound::Bound;

use keyward_core::telemetry::{ATTR_OP, ATTR_OUTCOME};

fn decision_attributes(labels: &[KeyValue; 2], outcome: &'static str) -> [KeyValue; 3] {
    let [layer, route] = labels;
    [
        layer.clone(),
        route.clone(),
        KeyValue::new(ATTR_OUTCOME, outcome),
    ]
}

fn store_attributes(op: &'static str) -> [KeyValue; 1] {
    [KeyValue::new(ATTR_OP, op)]
}

#[cfg(not(feature = "bound-instruments"))]
mod unbound {
    use super::*;

    /// Nothing bound: every point carries its attributes.
    pub(crate) struct Bound;

    impl Bound {
        pub(crate) fn new() -> Self {
            Bound
        }

        pub(crate) fn decision(
            &self,
            counter: &Counter<u64>,
            labels: &[KeyValue; 2],
            outcome: &'static str,
        ) {
            counter.add(1, &decision_attributes(labels, outcome));
        }

        pub(crate) fn store_call(
            &self,
            histogram: &Histogram<f64>,
            op: &'static str,
            seconds: f64,
        ) {
            histogram.record(seconds, &store_attributes(op));
        }

        pub(crate) fn wait(
            &self,
            histogram: &Histogram<f64>,
            labels: &[KeyValue; 2],
            seconds: f64,
        ) {
            histogram.record(seconds, labels);
        }

        pub(crate) fn fail_open(&self, counter: &Counter<u64>, labels: &[KeyValue; 2]) {
            counter.add(1, labels);
        }

        pub(crate) fn waiting(
            &self,
            counter: &UpDownCounter<i64>,
            labels: &[KeyValue; 2],
            delta: i64,
        ) {
            counter.add(delta, labels);
        }
    }
}

#[cfg(feature = "bound-instruments")]
mod bound_handles {
    use std::sync::OnceLock;

    use opentelemetry::metrics::{BoundCounter, BoundHistogram, BoundUpDownCounter};

    use super::*;

    /// A layer's bound handles, each made on the first point it records (a bound
    /// series is exported from then on, so none is made before it has a point).
    #[derive(Default)]
    pub(crate) struct Bound {
        decisions: BoundBy<BoundCounter<u64>>,
        store: BoundBy<BoundHistogram<f64>>,
        waits: OnceLock<BoundHistogram<f64>>,
        fail_open: OnceLock<BoundCounter<u64>>,
        waiting: OnceLock<BoundUpDownCounter<i64>>,
    }

    impl Bound {
        pub(crate) fn new() -> Self {
            Bound::default()
        }

        pub(crate) fn decision(
            &self,
            counter: &Counter<u64>,
            labels: &[KeyValue; 2],
            outcome: &'static str,
        ) {
            let attributes = || decision_attributes(labels, outcome);
            match self.decisions.get(outcome, || counter.bind(&attributes())) {
                Some(bound) => bound.add(1),
                None => counter.add(1, &attributes()),
            }
        }

        pub(crate) fn store_call(
            &self,
            histogram: &Histogram<f64>,
            op: &'static str,
            seconds: f64,
        ) {
            match self.store.get(op, || histogram.bind(&store_attributes(op))) {
                Some(bound) => bound.record(seconds),
                None => histogram.record(seconds, &store_attributes(op)),
            }
        }

        pub(crate) fn wait(
            &self,
            histogram: &Histogram<f64>,
            labels: &[KeyValue; 2],
            seconds: f64,
        ) {
            let bound = self.waits.get_or_init(|| histogram.bind(labels));
            bound.record(seconds);
        }

        pub(crate) fn fail_open(&self, counter: &Counter<u64>, labels: &[KeyValue; 2]) {
            let bound = self.fail_open.get_or_init(|| counter.bind(labels));
            bound.add(1);
        }

        pub(crate) fn waiting(
            &self,
            counter: &UpDownCounter<i64>,
            labels: &[KeyValue; 2],
            delta: i64,
        ) {
            let bound = self.waiting.get_or_init(|| counter.bind(labels));
            bound.add(delta);
        }
    }

    /// Values one attribute takes at most per layer (outcomes, store operations).
    const VALUES: usize = 16;

    /// Handles bound on first use, one per value of one attribute; lock-free to read.
    struct BoundBy<B> {
        slots: [OnceLock<(&'static str, B)>; VALUES],
    }

    impl<B> Default for BoundBy<B> {
        fn default() -> Self {
            BoundBy {
                slots: std::array::from_fn(|_| OnceLock::new()),
            }
        }
    }

    impl<B> BoundBy<B> {
        /// The handle of `value`, bound with `bind` if it has none yet. `None` when
        /// every slot holds another value, or another thread just took the free one:
        /// the caller records unbound (into the same series).
        fn get(&self, value: &'static str, bind: impl FnOnce() -> B) -> Option<&B> {
            for slot in &self.slots {
                match slot.get() {
                    Some((held, handle)) if *held == value => return Some(handle),
                    Some(_) => continue,
                    None => {
                        let (held, handle) = slot.get_or_init(|| (value, bind()));
                        return (*held == value).then_some(handle);
                    }
                }
            }
            None
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn each_value_gets_its_own_handle_and_a_full_set_says_none() {
            let bound: BoundBy<&'static str> = BoundBy::default();
            assert_eq!(bound.get("a", || "A"), Some(&"A"));
            assert_eq!(bound.get("b", || "B"), Some(&"B"));
            // Bound once: a second `bind` is never called.
            assert_eq!(bound.get("a", || panic!("bound twice")), Some(&"A"));
            const NAMES: [&str; VALUES] = [
                "v0", "v1", "v2", "v3", "v4", "v5", "v6", "v7", "v8", "v9", "v10", "v11", "v12",
                "v13", "v14", "v15",
            ];
            for name in &NAMES[2..] {
                assert!(bound.get(name, || "x").is_some());
            }
            assert_eq!(bound.get("one too many", || "x"), None);
        }
    }
}
