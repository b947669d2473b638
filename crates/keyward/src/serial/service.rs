use std::fmt;
use std::task::{Context, Poll};

use http::{Request, Response};
use http_body::Body;
use keyward_core::store::SerialStore;
use keyward_core::{KeyExtractor, KeySpec, KeywardBody};
use tower_service::Service;

use super::body::PermitBody;
use super::future::Coordinated;
use super::layer::SerialSettings;
use super::remove_fencing_header;
use crate::pipeline::{KeyedService, ResponseFuture};

/// The service built by [`PerKeySerialLayer`](super::PerKeySerialLayer).
pub struct PerKeySerialService<S, St, K = KeySpec> {
    pub(crate) core: KeyedService<S, St, K, SerialSettings>,
}

/// The old name of [`PerKeySerialService`].
#[deprecated(note = "renamed to `PerKeySerialService`, like the other layers' services")]
pub type PerKeySerial<S, St, K = KeySpec> = PerKeySerialService<S, St, K>;

impl<S, St, K, ReqBody, ResBody> Service<Request<ReqBody>> for PerKeySerialService<S, St, K>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone,
    St: SerialStore,
    K: KeyExtractor<ReqBody>,
    ResBody: Body,
{
    type Response = Response<KeywardBody<PermitBody<ResBody, St>>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, Coordinated<S, St, ReqBody>, PermitBody<ResBody, St>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.core.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        // Only the layer's own token reaches the inner service: a coordinated request gets
        // it once its turn comes, an uncoordinated one none.
        remove_fencing_header(&mut req);
        match self.core.prepare(req).keyed() {
            Ok(keyed) => {
                let store = self.core.store.clone();
                let config = &self.core.config;
                ResponseFuture::coordinated(Coordinated::new(keyed, store, config))
            }
            Err(answered_or_passed) => answered_or_passed,
        }
    }
}

impl<S: Clone, St: Clone, K> Clone for PerKeySerialService<S, St, K> {
    fn clone(&self) -> Self {
        PerKeySerialService {
            core: self.core.clone(),
        }
    }
}

impl<S: fmt::Debug, St, K> fmt::Debug for PerKeySerialService<S, St, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let config = &self.core.config;
        f.debug_struct("PerKeySerialService")
            .field("inner", &self.core.inner)
            .field("route", &config.common.route)
            .field("max_wait", &config.own.limits.max_wait)
            .field("max_queue", &config.own.limits.max_queue)
            .finish_non_exhaustive()
    }
}
