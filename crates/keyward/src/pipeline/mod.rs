//! The keyed pipeline: what every layer shares, written once.
//!
//! A request's way through any keyward layer:
//!
//! 1. [`KeyedService::prepare`]: take the ready inner service, extract the key with the
//!    layer's [`KeyExtractor`](keyward_core::KeyExtractor), let the layer check it
//!    ([`LayerSettings::accept_key`]), scope it by the principal, build the
//!    [`ScopedKey`](keyward_core::ScopedKey) (`{prefix}:{route}:{scope}:{key}`, prefix
//!    from [`LayerKind`]) and open the decision span ([`LayerKind::span`]).
//! 2. The layer's own decision (its folder): quota checks, idempotency claims, serial
//!    acquires, single flight leads or follows, each through its store trait.
//! 3. The [`ResponseFuture`]: answered by the layer, passed through, or coordinated.
//!
//! Responses that reach another request (a replay, a follower's copy) are read with
//! [`buffer_response`] and rendered with [`render_stored`], filtered by one list of
//! headers that are never shared (`stored::NEVER_SHARED`).

mod buffer;
mod future;
mod keyed;
mod kind;
mod request_body;
mod stored;
mod trace;

pub(crate) use buffer::{Buffered, buffer_response};
pub use future::{Boxed, ResponseFuture};
pub use keyed::ScopeMissing;
pub(crate) use keyed::{
    Common, Config, Keyed, KeyedLayer, KeyedService, LayerSettings, Prepared, common_layer_methods,
    debug_layer,
};
pub(crate) use kind::LayerKind;
pub(crate) use request_body::read_body;
pub(crate) use stored::{render_stored, shareable_headers};
pub(crate) use trace::Trace;
