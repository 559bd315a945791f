//! What the coordinator and the worker share to be watched: log output (`--log-format pretty|json`, `RUST_LOG`),
//! span export over OTLP/gRPC (`--otlp-endpoint` or `OTEL_EXPORTER_OTLP_ENDPOINT`) with W3C
//! trace context carried in gRPC metadata, and a Prometheus `/metrics` endpoint
//! (`--metrics-listen ADDR`).
//!
//! Trace context flows both ways over the one gRPC connection: the coordinator's `Join` answer
//! carries its run span's `traceparent`, which becomes the parent of the worker's span (so a
//! step's trace holds every rank's spans), and every worker request carries the worker's current
//! span, which becomes the parent of the coordinator's RPC span.
//!
//! The metrics are recorded with the `metrics` facade into `metrics-exporter-prometheus`'s
//! recorder, and rendered by a small hyper route of our own rather than the exporter's built-in
//! listener: the listener is bound here, before anything else starts, so a busy port fails the
//! start with a clear message and a port-0 address can be reported (printed, written to
//! `RUN_DIR/metrics.addr`) for tests and for the launched workers.
//!
//! The coordinator's port also serves its live page ([`HttpRoutes`]) under the run's access
//! policy ([`proto::auth`]: `/metrics` stays open, the page needs the token unless
//! `--open-status`, checkpoint downloads always do), over HTTPS when gRPC has TLS ([`Https`]).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use proto::auth::{Access, Decision, RequireToken};
use tokio::net::TcpListener;
use tokio_rustls::rustls;
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// How log lines are written.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines (coloured on a terminal).
    #[default]
    Pretty,
    /// One JSON object per line, with the current span's fields (run id, generation, rank, step).
    Json,
}

/// How the process's logs and spans go out.
pub struct LogSettings {
    pub format: LogFormat,
    /// The filter when `RUST_LOG` is not set.
    pub default_filter: &'static str,
    pub ansi: bool,
    /// OTLP/gRPC collector for spans (e.g. `http://otel-collector:4317`); none: no export.
    pub otlp_endpoint: Option<String>,
    /// `service.name` of the exported spans.
    pub service_name: &'static str,
}

/// The span exporter, flushed by [`Telemetry::shutdown`]. Hold it for the process's life.
#[must_use = "call shutdown() before exiting, or queued spans are lost"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Exports the spans still queued. Call inside the tokio runtime, before it is dropped.
    pub fn shutdown(self) {
        if let Some(p) = self.provider {
            if let Err(e) = p.shutdown() {
                eprintln!("warning: exporting the last spans failed: {e}");
            }
        }
    }
}

/// Installs the global tracing subscriber: `RUST_LOG` if set, else the default filter; lines in
/// the chosen format to `writer`; spans to the OTLP endpoint if one is given. Call inside a tokio
/// runtime (the gRPC exporter's channel lives there).
pub fn init<W>(settings: &LogSettings, writer: W) -> anyhow::Result<Telemetry>
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    // The log lines and the exported spans are filtered apart: `--quiet` silences the terminal,
    // not the traces. RUST_LOG, when set, filters both.
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(settings.default_filter));
    let span_filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt_layer = match settings.format {
        LogFormat::Pretty => tracing_subscriber::fmt::layer()
            .with_target(false)
            .with_ansi(settings.ansi)
            .with_writer(writer)
            .with_filter(filter)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .with_writer(writer)
            .with_filter(filter)
            .boxed(),
    };
    let provider = match settings.otlp_endpoint.as_deref().filter(|e| !e.is_empty()) {
        None => None,
        Some(endpoint) => {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint)
                .build()
                .with_context(|| format!("cannot build the OTLP exporter for {endpoint} (--otlp-endpoint)"))?;
            let resource = opentelemetry_sdk::Resource::builder().with_service_name(settings.service_name).build();
            Some(SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource).build())
        }
    };
    let otel_layer = provider
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer("dcgan")).with_filter(span_filter));
    if provider.is_some() {
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    }
    tracing_subscriber::registry()
        .with(fmt_layer)
        .with(otel_layer)
        .try_init()
        .context("cannot install the log subscriber")?;
    Ok(Telemetry { provider })
}

struct MetadataInjector<'a>(&'a mut MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (MetadataKey::from_bytes(key.as_bytes()), MetadataValue::try_from(value.as_str())) {
            self.0.insert(k, v);
        }
    }
}

struct HeaderExtractor<'a>(&'a tonic::codegen::http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// Writes `span`'s trace context (`traceparent`) into gRPC metadata; a no-op without export.
pub fn inject_context(span: &tracing::Span, metadata: &mut MetadataMap) {
    let cx = span.context();
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&cx, &mut MetadataInjector(metadata)));
}

/// Makes the trace context found in `headers` (if any) the parent of `span`.
pub fn adopt_context(span: &tracing::Span, headers: &tonic::codegen::http::HeaderMap) {
    let cx = opentelemetry::global::get_text_map_propagator(|p| p.extract(&HeaderExtractor(headers)));
    if cx.span().span_context().is_valid() {
        let _ = span.set_parent(cx);
    }
}

/// A client interceptor that stamps the caller's current span, and the run token when there is
/// one, on every request.
#[derive(Clone, Debug, Default)]
pub struct TraceContext {
    token: Option<proto::auth::Token>,
}

impl TraceContext {
    pub fn with_token(token: Option<proto::auth::Token>) -> Self {
        Self { token }
    }
}

impl tonic::service::Interceptor for TraceContext {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        inject_context(&tracing::Span::current(), req.metadata_mut());
        if let Some(token) = &self.token {
            token.stamp(&mut req);
        }
        Ok(req)
    }
}

/// Bucket bounds (seconds) of the step-phase histograms: from a fast GPU step to a slow CPU one.
pub const SECONDS_BUCKETS: &[f64] = &[0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// The `/metrics` HTTP listener, bound but not yet serving.
pub struct MetricsListener {
    listener: TcpListener,
    pub addr: SocketAddr,
}

impl MetricsListener {
    /// Binds `addr` (port 0 picks a free port; [`MetricsListener::addr`] says which).
    pub async fn bind(addr: SocketAddr) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} for metrics (--metrics-listen)"))?;
        let addr = listener.local_addr().context("metrics listener address")?;
        Ok(Self { listener, addr })
    }

    /// Installs the process's Prometheus recorder (with `labels` on every series) and serves
    /// `GET /metrics` until the process exits.
    pub fn serve(self, labels: &[(&str, String)]) -> anyhow::Result<PrometheusHandle> {
        self.serve_with(labels, None, HttpAccess::default())
    }

    /// As [`MetricsListener::serve`], with `routes` answering the other GET requests (the
    /// coordinator's live page shares the port), under `access`.
    pub fn serve_with(
        self,
        labels: &[(&str, String)],
        routes: Option<Routes>,
        access: HttpAccess,
    ) -> anyhow::Result<PrometheusHandle> {
        let mut builder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_duration_seconds".into()), SECONDS_BUCKETS)
            .context("histogram buckets")?;
        for (k, v) in labels {
            builder = builder.add_global_label(*k, v.clone());
        }
        let handle = builder.install_recorder().context("cannot install the metrics recorder")?;
        tokio::spawn(serve_http(self.listener, handle.clone(), routes, access));
        // Histograms keep their samples until upkeep drains them; scrapes also do it.
        let upkeep = handle.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tick.tick().await;
                upkeep.run_upkeep();
            }
        });
        Ok(handle)
    }
}

/// An answer of [`Routes`].
pub struct HttpReply {
    pub status: StatusCode,
    pub content_type: &'static str,
    pub body: Bytes,
    /// Sent as `Cache-Control` when set.
    pub cache_control: Option<&'static str>,
}

/// Extra GET routes beside `/metrics`.
pub trait HttpRoutes: Send + Sync {
    /// The class of the route at `path_and_query`, `None` when there is no such route (404,
    /// before the token is asked for: what is not served needs no protection). Decided from
    /// the path alone, never from whether a file exists, so a refusal tells nothing about what
    /// the run holds.
    fn access(&self, path_and_query: &str) -> Option<Access>;
    /// The answer, or `None` (404).
    fn answer(&self, path_and_query: &str) -> Option<HttpReply>;
}

/// The routes a port serves beside `/metrics`.
pub type Routes = Arc<dyn HttpRoutes>;

/// Who may read what on the HTTP port, and whether it speaks HTTPS. The default: all open,
/// plain HTTP (a worker's port, which serves `/metrics` only).
#[derive(Clone, Default)]
pub struct HttpAccess {
    /// The run's policy, the same as the gRPC port's.
    pub auth: RequireToken,
    pub https: Option<Https>,
}

/// How long a client gets for its TLS handshake before the connection is dropped.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A TLS server configuration for the HTTP port (the certificate and key of the gRPC port).
#[derive(Clone)]
pub struct Https(Arc<rustls::ServerConfig>);

impl Https {
    /// From PEM files: a certificate chain and its private key (`--tls-cert`, `--tls-key`). A
    /// key that does not belong to the certificate is refused here, not at the first connection.
    pub fn from_pem_files(cert: &Path, key: &Path) -> anyhow::Result<Self> {
        use rustls::pki_types::pem::PemObject as _;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certs = CertificateDer::pem_file_iter(cert)
            .and_then(|c| c.collect::<Result<Vec<_>, _>>())
            .with_context(|| format!("--tls-cert {}: cannot read its certificates", cert.display()))?;
        let key_der = PrivateKeyDer::from_pem_file(key)
            .with_context(|| format!("--tls-key {}: cannot read its private key", key.display()))?;
        // The process's TLS (tonic's, ureq's) is rustls on ring: the same provider, named here
        // rather than left to a process-wide default.
        let mut config =
            rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .context("TLS protocol versions")?
                .with_no_client_auth()
                .with_single_cert(certs, key_der)
                .with_context(|| {
                    format!("--tls-cert {} with --tls-key {}: not a usable pair", cert.display(), key.display())
                })?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self(Arc::new(config)))
    }
}

async fn serve_http(listener: TcpListener, handle: PrometheusHandle, routes: Option<Routes>, access: HttpAccess) {
    let tls = access.https.map(|h| tokio_rustls::TlsAcceptor::from(h.0));
    let auth = Arc::new(access.auth);
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!("metrics listener: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (handle, routes, auth, tls) = (handle.clone(), routes.clone(), Arc::clone(&auth), tls.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let (handle, routes, auth) = (handle.clone(), routes.clone(), Arc::clone(&auth));
                async move {
                    // Routes may read files: off the async threads.
                    let response = tokio::task::spawn_blocking(move || respond(&req, &handle, routes.as_ref(), &auth))
                        .await
                        .unwrap_or_else(|_| plain(StatusCode::INTERNAL_SERVER_ERROR, "internal error\n".into()));
                    Ok::<_, Infallible>(response)
                }
            });
            let http = hyper::server::conn::http1::Builder::new();
            let served = match tls {
                None => http.serve_connection(TokioIo::new(stream), service).await,
                Some(acceptor) => match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(stream)) => http.serve_connection(TokioIo::new(stream), service).await,
                    Ok(Err(e)) => return tracing::debug!("metrics connection: TLS handshake: {e}"),
                    Err(_) => return tracing::debug!("metrics connection: no TLS handshake in time"),
                },
            };
            if let Err(e) = served {
                tracing::debug!("metrics connection: {e}");
            }
        });
    }
}

/// What a refused request is told: the person at the browser or at curl.
const UNAUTHORIZED: &str = "401 Unauthorized: this run's live page needs its run token (the coordinator's --token, \
--token-file or DCGAN_TOKEN).
In a browser: give the token as the password in the login prompt (any user name).
With curl:    curl -H \"Authorization: Bearer $DCGAN_TOKEN\" URL    or    curl -u :TOKEN URL
The coordinator's --open-status opens the page, its data and its sample grids without the token; \
checkpoint downloads always need it, and /metrics never does.
";

/// A 401 whose `WWW-Authenticate` makes a browser ask for the token.
fn unauthorized() -> Response<Full<Bytes>> {
    let mut response = plain(StatusCode::UNAUTHORIZED, UNAUTHORIZED.into());
    response.headers_mut().insert(
        hyper::header::WWW_AUTHENTICATE,
        hyper::header::HeaderValue::from_static("Basic realm=\"dcgan run\", charset=\"UTF-8\""),
    );
    response
}

fn plain(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    reply(HttpReply { status, content_type: "text/plain; charset=utf-8", body: Bytes::from(body), cache_control: None })
}

fn reply(r: HttpReply) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(r.body));
    *response.status_mut() = r.status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(r.content_type) {
        response.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    if let Some(c) = r.cache_control {
        response.headers_mut().insert(hyper::header::CACHE_CONTROL, hyper::header::HeaderValue::from_static(c));
    }
    response
}

fn respond<B>(
    req: &Request<B>,
    handle: &PrometheusHandle,
    routes: Option<&Routes>,
    auth: &RequireToken,
) -> Response<Full<Bytes>> {
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    // The run's policy first: `/metrics`, and a port without routes, are open.
    let access = match (req.uri().path(), routes) {
        ("/metrics", _) | (_, None) => Some(Access::Open),
        (_, Some(r)) => r.access(path),
    };
    if let Some(access) = access {
        let authorization = req.headers().get(hyper::header::AUTHORIZATION).map(|v| v.as_bytes());
        if auth.decide(access, authorization) == Decision::Refuse {
            return unauthorized();
        }
    }
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => {
            handle.run_upkeep();
            reply(HttpReply {
                status: StatusCode::OK,
                content_type: "text/plain; version=0.0.4; charset=utf-8",
                body: Bytes::from(handle.render()),
                cache_control: None,
            })
        }
        (&Method::GET, _) if routes.is_some() => match routes.and_then(|r| r.answer(path)) {
            Some(r) => reply(r),
            None => plain(StatusCode::NOT_FOUND, format!("not found: {path}\n")),
        },
        (&Method::GET, "/") => plain(StatusCode::OK, "metrics at /metrics\n".into()),
        _ => plain(StatusCode::NOT_FOUND, "not found: try GET /metrics\n".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A route of each class, served whatever the path's tail.
    struct ThreeRoutes;

    impl HttpRoutes for ThreeRoutes {
        fn access(&self, path: &str) -> Option<Access> {
            match path {
                "/page" => Some(Access::Status),
                "/secret" => Some(Access::Secret),
                "/open" => Some(Access::Open),
                _ => None,
            }
        }

        fn answer(&self, path: &str) -> Option<HttpReply> {
            self.access(path).map(|_| HttpReply {
                status: StatusCode::OK,
                content_type: "text/plain",
                body: Bytes::from_static(b"yes"),
                cache_control: None,
            })
        }
    }

    #[test]
    fn the_policy_guards_the_routes_and_a_refusal_asks_for_the_token() {
        let handle = PrometheusBuilder::new().build_recorder().handle();
        let routes: Routes = Arc::new(ThreeRoutes);
        let token = proto::auth::Token::new("s3cret").unwrap();
        let get = |path: &str, authorization: Option<&str>, open_reads: bool| {
            let mut req = Request::get(path);
            if let Some(a) = authorization {
                req = req.header("authorization", a);
            }
            let auth = RequireToken { token: Some(token.clone()), open_reads };
            respond(&req.body(()).unwrap(), &handle, Some(&routes), &auth)
        };
        for open in [false, true] {
            assert_eq!(get("/metrics", None, open).status(), StatusCode::OK);
            assert_eq!(get("/open", None, open).status(), StatusCode::OK);
            assert_eq!(get("/secret", None, open).status(), StatusCode::UNAUTHORIZED);
            assert_eq!(get("/secret", Some("Bearer s3cret"), open).status(), StatusCode::OK);
            // "u:s3cret"
            assert_eq!(get("/page", Some("Basic dTpzM2NyZXQ="), open).status(), StatusCode::OK);
            assert_eq!(get("/nope", None, open).status(), StatusCode::NOT_FOUND);
        }
        assert_eq!(get("/page", None, true).status(), StatusCode::OK);
        let refused = get("/page", Some("Bearer guess"), false);
        assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(refused.headers()["www-authenticate"], "Basic realm=\"dcgan run\", charset=\"UTF-8\"");
        assert!(refused.headers()["content-type"].to_str().unwrap().starts_with("text/plain"));

        // No token configured, or a port with no routes (a worker's): open.
        let open =
            respond(&Request::get("/secret").body(()).unwrap(), &handle, Some(&routes), &RequireToken::default());
        assert_eq!(open.status(), StatusCode::OK);
        let auth = RequireToken { token: Some(token.clone()), open_reads: false };
        assert_eq!(respond(&Request::get("/metrics").body(()).unwrap(), &handle, None, &auth).status(), StatusCode::OK);
    }

    #[test]
    fn files_that_are_not_pem_are_refused_naming_the_flag() {
        let dir = std::env::temp_dir().join(format!("dcgan-https-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (cert, key) = (dir.join("c.pem"), dir.join("k.pem"));
        std::fs::write(&cert, "not a certificate").unwrap();
        std::fs::write(&key, "not a key").unwrap();
        let err = Https::from_pem_files(&cert, &key).err().expect("refused");
        let _ = std::fs::remove_dir_all(&dir);
        assert!(format!("{err:#}").contains("--tls-key"), "{err:#}");
        let err = Https::from_pem_files(&dir.join("gone.pem"), &key).err().expect("refused");
        assert!(format!("{err:#}").contains("--tls-cert"), "{err:#}");
    }
}
