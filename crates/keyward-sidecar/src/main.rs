//! `keyward`: keyward's layers in front of any HTTP upstream.
#![forbid(unsafe_code)]

mod admin;
mod app;
mod config;
mod exemplars;
mod explain;
mod fifo_timer;
mod hotkeys;
mod http_metrics;
mod ingress;
mod keys;
mod metrics;
mod pool;
mod prometheus;
mod proxy;
mod reload;
mod server;
mod stack;
mod telemetry;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use config::{Backend, Config, LogFormat};

/// The allocator: see BENCHMARKS.md ("Sidecar vs nginx") for what glibc malloc cost.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use metrics::Metrics;
use telemetry::Telemetry;

/// Exit code for a configuration that cannot be used (EX_USAGE... EX_DATAERR is 65;
/// 64 is what `keyward check` has always promised).
const EXIT_BAD_CONFIG: u8 = 64;

/// Longest wait for the telemetry still buffered to be sent at exit.
const TELEMETRY_FLUSH: std::time::Duration = std::time::Duration::from_secs(3);

/// Where the config file format is described, for every `--help`.
const CONFIG_HELP: &str = "Config file format: docs/config.md \
(https://github.com/keyward/keyward/blob/main/docs/config.md); \
examples: examples/sidecar/*.toml";

/// One coordinator per key: idempotent retries, per-key serial execution, per-key quotas
/// and request coalescing in front of any HTTP upstream.
#[derive(Parser)]
#[command(name = "keyward", version, about, long_about = None, after_help = CONFIG_HELP)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy (and the admin listener) with the routes of a config file.
    #[command(after_help = CONFIG_HELP)]
    Serve {
        /// The TOML config file (format: docs/config.md).
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Check a config file: exit 0 and explain each route's stack in one line, or exit 64
    /// naming every problem.
    #[command(after_help = CONFIG_HELP)]
    Check {
        /// The TOML config file (format: docs/config.md).
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Print the key_hash that logs, spans, /hotkeys and /keys show for a raw key, keyed
    /// with KEYWARD_KEY_HASH_SECRET (the serving sidecar's must be the same).
    Hash {
        /// The raw key as the layer sees it: a header value, `203.0.113.7`, `2001:db8::/64`.
        key: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Hash { key } => match keys::secret_from_env() {
            Some(secret) => {
                println!("{}", keyward_core::KeyHash::keyed(&secret, key.as_bytes()));
                ExitCode::SUCCESS
            }
            None => {
                eprintln!(
                    "keyward: {} is not set: without it every sidecar hashes keys with a random secret of its own; set the same value for the sidecar and for `keyward hash`, or look the key up with GET /keys/ROUTE/KEY on the admin listener",
                    keys::SECRET_ENV
                );
                ExitCode::from(EXIT_BAD_CONFIG)
            }
        },
        Command::Check { config } => match Config::load(&config) {
            Ok(config) => {
                println!("{}", summary(&config));
                if let Some(warning) = admin_warning(&config) {
                    eprintln!("warning: {warning}");
                }
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("keyward: {err}");
                ExitCode::from(EXIT_BAD_CONFIG)
            }
        },
        Command::Serve { config: path } => {
            let config = match Config::load(&path) {
                Ok(config) => config,
                Err(err) => {
                    eprintln!("keyward: {err}");
                    return ExitCode::from(EXIT_BAD_CONFIG);
                }
            };
            let secret = match keys::install_key_hash_secret() {
                Ok(source) => source,
                Err(err) => {
                    eprintln!("keyward: {err}");
                    return ExitCode::FAILURE;
                }
            };
            // The proxy's workers run their own runtimes (see `server`); this one has the
            // admin listener, the store's connections and background tasks, and telemetry.
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("keyward-main")
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(err) => {
                    eprintln!("keyward: cannot start the runtime: {err}");
                    return ExitCode::FAILURE;
                }
            };
            let code = runtime.block_on(serve(config, path, secret));
            // A telemetry flush that outlived its bound must not hold up the exit.
            runtime.shutdown_timeout(std::time::Duration::from_secs(1));
            code
        }
    }
}

/// What `check` (and `serve`) warn about: an admin listener that other machines reach,
/// with nothing to stop them from deleting keys.
fn admin_warning(config: &Config) -> Option<String> {
    let addr = config.server.admin?;
    (!addr.ip().is_loopback() && config.server.admin_token.is_none()).then(|| {
        format!(
            "server.admin {addr} is reachable beyond loopback and server.admin_token is not set: anyone who reaches it can read metrics and key states, forget idempotency keys (DELETE /keys) and reload the config; set server.admin_token or bind it to 127.0.0.1"
        )
    })
}

fn summary(config: &Config) -> String {
    let backend = match &config.store.backend {
        Backend::Memory => "memory".to_owned(),
        Backend::Redis { urls, cluster } => format!(
            "redis{} {}",
            if *cluster { " cluster" } else { "" },
            urls.iter()
                .map(|url| config::redact_url(url))
                .collect::<Vec<_>>()
                .join(",")
        ),
    };
    let admin = config
        .server
        .admin
        .map_or_else(|| "off".to_owned(), |addr| addr.to_string());
    let mut out = format!(
        "ok: listen {} -> upstream {}, admin {admin}, store {backend}, {} route(s)",
        config.server.listen,
        config.server.upstream,
        config.routes.len()
    );
    for route in &config.routes {
        out.push_str("\n  ");
        out.push_str(&explain::route(route));
    }
    out
}

fn init_logging(format: LogFormat, tracer: Option<opentelemetry_sdk::trace::Tracer>) {
    // The OpenTelemetry SDK logs its own failures (an unreachable collector) as warnings;
    // its info lines are noise.
    let filter = EnvFilter::try_from_env("KEYWARD_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,opentelemetry=warn"));
    telemetry::set_log_shows_spans(
        filter
            .max_level_hint()
            .is_none_or(|level| level >= tracing::level_filters::LevelFilter::INFO),
    );
    let fmt = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_target(false)
            // Colours only for a person at a terminal, never in collected logs.
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_target(false)
            .boxed(),
    };
    // Exported to OTLP: keyward's spans, and warnings inside them as span events. A
    // decision span is made only inside a request span, which the app keeps only for a
    // sampled trace (or a log that shows spans): an unsampled request makes no spans.
    let otel = tracer.map(|tracer| {
        tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_filter(tracing_subscriber::filter::dynamic_filter_fn(|meta, cx| {
                if meta.is_span() {
                    meta.name() == metrics::REQUEST_SPAN
                        || (meta.name().starts_with("keyward.") && cx.lookup_current().is_some())
                } else {
                    *meta.level() <= tracing::Level::WARN
                }
            }))
    });
    tracing_subscriber::registry()
        .with(otel)
        .with(fmt.with_filter(filter))
        .init();
}

/// The app, the admin look-ups and the reloader that rebuilds both on `store`.
fn live<St: stack::Store>(
    config: &Config,
    path: PathBuf,
    store: St,
    meter: &opentelemetry::metrics::Meter,
    hot_keys: hotkeys::HotKeys,
) -> (
    Result<app::App, matchit::InsertError>,
    admin::AdminShared,
    std::sync::Arc<reload::Reloader>,
) {
    let admin_routes = |config: &Config| admin::AdminRoutes {
        keys: keys::KeyLookup::new(config, &store, meter),
        quotas: keys::QuotaLookup::new(config, &store, meter),
        token: config.server.admin_token.clone(),
    };
    let shared = admin::AdminShared::new(admin_routes(config));
    let app = app::App::new(config, &store, meter, hot_keys);
    let apply: Box<reload::Apply> = {
        let (app, shared, meter) = (app.as_ref().ok().cloned(), shared.clone(), meter.clone());
        Box::new(move |config: &Config| {
            let Some(app) = &app else {
                return Err("the sidecar has no routes to replace".to_owned());
            };
            app.reload(config, &store, &meter)
                .map_err(|err| err.to_string())?;
            shared.replace(admin::AdminRoutes {
                keys: keys::KeyLookup::new(config, &store, &meter),
                quotas: keys::QuotaLookup::new(config, &store, &meter),
                token: config.server.admin_token.clone(),
            });
            Ok(())
        })
    };
    let reloader = reload::Reloader::new(path, config.clone(), apply);
    (app, shared, std::sync::Arc::new(reloader))
}

async fn serve(config: Config, path: PathBuf, secret: keys::SecretSource) -> ExitCode {
    let metrics = Metrics::default();
    let telemetry = match Telemetry::start(&config.telemetry, &metrics) {
        Ok(telemetry) => telemetry,
        Err(err) => {
            eprintln!("keyward: telemetry.otlp_endpoint: {err}");
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
    };
    init_logging(config.telemetry.log_format, telemetry.tracer());
    if let Some(endpoint) = &config.telemetry.otlp_endpoint {
        tracing::info!(%endpoint, "exporting traces and metrics over OTLP/gRPC");
    }
    if secret == keys::SecretSource::Random {
        tracing::info!(
            "key hashes are keyed with a random secret of this process; set {} to make them stable and computable with `keyward hash`",
            keys::SECRET_ENV
        );
    }
    let meter = telemetry.meter();
    let (app, ready, admin_shared, reloader) = match &config.store.backend {
        Backend::Memory => {
            let store = keyward::MemoryStore::builder()
                .max_response_bytes(config.store.max_response_bytes)
                .max_reuse_bytes(config.store.max_reuse_bytes)
                .max_quota_keys(config.store.max_quota_keys)
                .max_claims(config.store.max_claims)
                .max_serial_keys(config.store.max_serial_keys)
                .build();
            http_metrics::observe_memory_tables(&meter, &store);
            let (app, shared, reloader) =
                live(&config, path, store, &meter, metrics.hot_keys().clone());
            (app, admin::Readiness::always(), shared, reloader)
        }
        Backend::Redis { urls, cluster } => {
            let shown = urls
                .iter()
                .map(|url| config::redact_url(url))
                .collect::<Vec<_>>()
                .join(",");
            let built = urls
                .iter()
                .fold(keyward::RedisStore::builder(), |builder, url| {
                    builder.url(url.as_str())
                })
                .prefix(config.store.prefix.as_str())
                .timeout(config.store.timeout)
                .serial_lease(config.store.serial_lease)
                .cluster(*cluster)
                .build();
            let store = match built {
                Ok(store) => store,
                Err(err) => {
                    eprintln!("keyward: store: {err}");
                    return ExitCode::from(EXIT_BAD_CONFIG);
                }
            };
            match store.ping().await {
                Ok(()) => tracing::info!(url = %shown, "redis store ready"),
                Err(error) => {
                    tracing::warn!(url = %shown, %error, "redis not answering yet; requests follow store.on_error until it does")
                }
            }
            let (app, shared, reloader) = live(
                &config,
                path,
                store.clone(),
                &meter,
                metrics.hot_keys().clone(),
            );
            (app, admin::Readiness::redis(store), shared, reloader)
        }
    };
    let app = match app {
        Ok(app) => app,
        Err(err) => {
            eprintln!("keyward: routes: {err}");
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
    };
    if let Err(err) = reload::on_sighup(reloader.clone()) {
        tracing::warn!(%err, "cannot listen for SIGHUP; reload with POST /reload on the admin listener");
    }
    let listeners = match server::Listeners::bind(config.server.listen, config.server.workers) {
        Ok(listeners) => listeners,
        Err(err) => {
            tracing::error!(listen = %config.server.listen, %err, "cannot listen");
            return ExitCode::FAILURE;
        }
    };
    if let Some(addr) = config.server.admin {
        if let Some(warning) = admin_warning(&config) {
            tracing::warn!("{warning}");
        } else if !addr.ip().is_loopback() {
            tracing::warn!(%addr, "the admin listener is reachable from other machines");
        }
        match tokio::net::TcpListener::bind(addr).await {
            Ok(admin) => {
                let router = admin::router(metrics.clone(), ready, admin_shared, Some(reloader))
                    .into_make_service_with_connect_info::<std::net::SocketAddr>();
                tokio::spawn(async move {
                    if let Err(err) = axum::serve(admin, router).await {
                        tracing::error!(%err, "admin listener stopped");
                    }
                });
            }
            Err(err) => {
                tracing::error!(%addr, %err, "cannot listen for admin");
                return ExitCode::FAILURE;
            }
        }
    }
    tracing::info!(service = %config.telemetry.service_name, listen = %config.server.listen, upstream = %config.server.upstream, routes = config.routes.len(), workers = config.server.workers, "keyward serving");
    let deadlines = server::ClientDeadlines {
        header_read: config.server.header_read_timeout,
        body_read: config.server.body_read_timeout,
        idle_write: config.server.idle_write_timeout,
    };
    let drained = server::serve(
        listeners,
        app,
        deadlines,
        config.server.shutdown_grace,
        server::shutdown_signal(),
    )
    .await;
    if drained {
        tracing::info!("all in-flight requests finished; bye");
    } else {
        tracing::warn!(
            "shutdown grace ran out; remaining requests were cut off and their claims released"
        );
    }
    telemetry.shutdown(TELEMETRY_FLUSH).await;
    ExitCode::SUCCESS
}
