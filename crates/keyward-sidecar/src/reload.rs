//! Live reload: `SIGHUP` or `POST /reload` on the admin listener re-reads the config
//! file, checks it exactly like `keyward check`, and swaps the routes and their layer
//! settings in one step ([`crate::app::App::reload`]); requests already running finish
//! under the settings they started with, and the store (its connections, its tables) is
//! the same before and after.
//!
//! Refused, with the old config still serving:
//! - a file `keyward check` refuses: the same field-named errors, logged and answered;
//! - a change that cannot apply to a running process ([`restart_needed`]): the listen and
//!   admin addresses, the client deadlines the accept loop holds, the whole `[store]` but
//!   `on_error`, `[telemetry]`. The answer names each such field and says a restart is
//!   needed.

use std::path::PathBuf;
use std::sync::Arc;

use http::StatusCode;
use serde_json::{Value, json};

use crate::config::{Config, ConfigError};

/// Why a reload was refused.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The file is not a valid config: what `keyward check` says.
    #[error("{0}")]
    Invalid(#[from] ConfigError),
    /// The file changes what only a restart applies.
    #[error(
        "not reloaded: {} changed, which a running sidecar cannot apply; restart keyward to use it (the old config keeps serving)",
        .0.join(", ")
    )]
    RestartNeeded(Vec<String>),
    /// The routes could not be built.
    #[error("routes: {0}")]
    Routes(String),
}

/// Swaps a checked config in: the routes, and the admin look-ups built from them.
pub type Apply = dyn Fn(&Config) -> Result<(), String> + Send + Sync;

/// Reloads the config file of a running sidecar, one reload at a time.
pub struct Reloader {
    path: PathBuf,
    current: tokio::sync::Mutex<Config>,
    apply: Box<Apply>,
}

impl Reloader {
    /// A reloader of `path`, serving `current` now; `apply` swaps a new config in.
    pub fn new(path: PathBuf, current: Config, apply: Box<Apply>) -> Self {
        Reloader {
            path,
            current: tokio::sync::Mutex::new(current),
            apply,
        }
    }

    /// Re-reads the file and swaps it in, or leaves everything as it is and says why.
    pub async fn reload(&self) -> Result<Config, ReloadError> {
        let mut current = self.current.lock().await;
        let path = self.path.clone();
        // Reading a file blocks: not on a runtime thread that serves requests.
        let next = tokio::task::spawn_blocking(move || Config::load(&path))
            .await
            .map_err(|err| ReloadError::Routes(format!("the reload task failed: {err}")))??;
        let fields = restart_needed(&current, &next);
        if !fields.is_empty() {
            return Err(ReloadError::RestartNeeded(fields));
        }
        (self.apply)(&next).map_err(ReloadError::Routes)?;
        *current = next.clone();
        Ok(next)
    }

    /// Reloads and logs the outcome; answers it for `POST /reload`.
    pub async fn reload_answer(&self, cause: &str) -> (StatusCode, Value) {
        match self.reload().await {
            Ok(config) => {
                tracing::info!(cause, path = %self.path.display(), routes = config.routes.len(), "config reloaded");
                (
                    StatusCode::OK,
                    json!({ "reloaded": true, "routes": config.routes.len(), "summary": crate::summary(&config) }),
                )
            }
            Err(err) => {
                tracing::error!(cause, path = %self.path.display(), "config not reloaded, the old one keeps serving: {err}");
                let status = match err {
                    ReloadError::RestartNeeded(_) => StatusCode::CONFLICT,
                    _ => StatusCode::UNPROCESSABLE_ENTITY,
                };
                (
                    status,
                    json!({ "reloaded": false, "error": err.to_string() }),
                )
            }
        }
    }
}

/// Reloads on every `SIGHUP`, for as long as the process runs.
pub fn on_sighup(reloader: Arc<Reloader>) -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangups = signal(SignalKind::hangup())?;
    tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            reloader.reload_answer("SIGHUP").await;
        }
    });
    Ok(())
}

/// The fields that differ between `old` and `new` but apply only at start-up.
pub fn restart_needed(old: &Config, new: &Config) -> Vec<String> {
    let mut changed = Vec::new();
    let mut check = |field: &str, same: bool| {
        if !same {
            changed.push(field.to_owned());
        }
    };
    let (a, b) = (&old.server, &new.server);
    check("server.listen", a.listen == b.listen);
    check("server.admin", a.admin == b.admin);
    check(
        "server.header_read_timeout",
        a.header_read_timeout == b.header_read_timeout,
    );
    check(
        "server.body_read_timeout",
        a.body_read_timeout == b.body_read_timeout,
    );
    check(
        "server.idle_write_timeout",
        a.idle_write_timeout == b.idle_write_timeout,
    );
    check(
        "server.shutdown_grace",
        a.shutdown_grace == b.shutdown_grace,
    );
    // One thread and one listening socket per worker, made at start-up.
    check("server.workers", a.workers == b.workers);
    let (a, b) = (&old.store, &new.store);
    check("store.backend", a.backend == b.backend);
    check("store.prefix", a.prefix == b.prefix);
    check("store.timeout", a.timeout == b.timeout);
    check(
        "store.max_response_bytes",
        a.max_response_bytes == b.max_response_bytes,
    );
    check("store.max_quota_keys", a.max_quota_keys == b.max_quota_keys);
    check("store.max_claims", a.max_claims == b.max_claims);
    check(
        "store.max_serial_keys",
        a.max_serial_keys == b.max_serial_keys,
    );
    check("store.serial_lease", a.serial_lease == b.serial_lease);
    check(
        "store.max_reuse_bytes",
        a.max_reuse_bytes == b.max_reuse_bytes,
    );
    let (a, b) = (&old.telemetry, &new.telemetry);
    check("telemetry.service_name", a.service_name == b.service_name);
    check(
        "telemetry.otlp_endpoint",
        a.otlp_endpoint == b.otlp_endpoint,
    );
    check("telemetry.log_format", a.log_format == b.log_format);
    changed
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const BASE: &str = r#"
[server]
listen = "127.0.0.1:8080"
upstream = "http://127.0.0.1:9000"

[[routes]]
name = "api"
path = "/api"
[routes.quota]
limit = 5
per = "1m"
"#;

    #[test]
    fn routes_and_upstream_apply_live_addresses_and_stores_do_not() {
        let old = Config::from_toml(BASE).unwrap();
        let routes = BASE.replace("limit = 5", "limit = 50");
        assert!(restart_needed(&old, &Config::from_toml(&routes).unwrap()).is_empty());
        let upstream = BASE.replace("9000", "9001");
        assert!(restart_needed(&old, &Config::from_toml(&upstream).unwrap()).is_empty());
        let moved = BASE.replace("8080", "8081")
            + "\n[store]\nbackend = \"redis\"\nurl = \"redis://127.0.0.1:6379\"\n";
        assert_eq!(
            restart_needed(&old, &Config::from_toml(&moved).unwrap()),
            ["server.listen", "store.backend"]
        );
        let err = ReloadError::RestartNeeded(vec!["server.listen".to_owned()]).to_string();
        assert!(
            err.contains("server.listen") && err.contains("restart"),
            "{err}"
        );
    }
}
