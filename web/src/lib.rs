//! The HTTP side of quern's nodes: a listener with the bearer-token rule,
//! and the Prometheus `/metrics` page. The namenode adds its UI to the same
//! router; a datanode serves metrics alone.
//!
//! Everything served here only reads. Loopback callers need nothing: they
//! could read the node's files anyway. A caller from beyond loopback must
//! present the operator's token (as `Authorization: Bearer TOKEN`, or once
//! as `?token=TOKEN`, which leaves a cookie for a browser's next pages),
//! and a node refuses to listen beyond loopback without one.

use axum::extract::{ConnectInfo, Request};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use std::net::SocketAddr;
use std::sync::Arc;

mod page;
pub use page::{escape, human_bytes, Page};

/// Where a node serves HTTP, and the token callers from beyond loopback
/// must present.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    pub listen: SocketAddr,
    pub token: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error(
        "HTTP on {0} would be reachable beyond this machine without authentication; give a \
         token (--http-token-file FILE) or listen on 127.0.0.1"
    )]
    NoToken(SocketAddr),
    #[error("cannot listen for HTTP on {0}: {1} (is another process using the port?)")]
    Bind(SocketAddr, std::io::Error),
}

/// A bound HTTP listener; [`Http::serve`] answers on it until the task
/// is dropped or aborted.
pub struct Http {
    listener: tokio::net::TcpListener,
    token: Option<Arc<str>>,
    addr: SocketAddr,
}

impl Http {
    pub async fn bind(cfg: &HttpConfig) -> Result<Http, HttpError> {
        let token = cfg
            .token
            .as_deref()
            .map(str::trim)
            .filter(|t| !t.is_empty());
        if !cfg.listen.ip().is_loopback() && token.is_none() {
            return Err(HttpError::NoToken(cfg.listen));
        }
        let listener = tokio::net::TcpListener::bind(cfg.listen)
            .await
            .map_err(|e| HttpError::Bind(cfg.listen, e))?;
        let addr = listener
            .local_addr()
            .map_err(|e| HttpError::Bind(cfg.listen, e))?;
        Ok(Http {
            listener,
            token: token.map(Arc::from),
            addr,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves `router` plus `/metrics` from `registry`, with the token
    /// rule in front of every page.
    pub async fn serve(self, router: Router, registry: prometheus::Registry) {
        let token = self.token.clone();
        let app = router
            .route(
                "/metrics",
                get(move || {
                    let registry = registry.clone();
                    async move { metrics_text(&registry) }
                }),
            )
            .layer(axum::middleware::from_fn(
                move |req: Request, next: Next| {
                    let token = token.clone();
                    async move { authorize(token.as_deref(), req, next).await }
                },
            ));
        let served = axum::serve(
            self.listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await;
        if let Err(e) = served {
            tracing::warn!(addr = %self.addr, "HTTP server stopped: {e}");
        }
    }
}

const COOKIE: &str = "quern_token";

async fn authorize(token: Option<&str>, req: Request, next: Next) -> Response {
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    if peer.is_some_and(|ip| ip.is_loopback() || ip.to_canonical().is_loopback()) {
        return next.run(req).await;
    }
    let Some(token) = token else {
        // Only reachable when bound to loopback but called from beyond it
        // (a forwarded port): still no token to check against.
        return refused("this node serves HTTP to its own machine only");
    };
    let from_header = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let from_cookie = req
        .headers()
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().strip_prefix(COOKIE)?.strip_prefix('='))
        .next();
    let from_query = req.uri().query().and_then(|q| {
        q.split('&')
            .filter_map(|kv| kv.strip_prefix("token="))
            .next()
    });
    let presented = [from_header, from_cookie, from_query];
    if !presented.iter().flatten().any(|t| same(t, token)) {
        return refused(
            "this page needs the operator's token: send `Authorization: Bearer TOKEN`, or open \
             it once with ?token=TOKEN",
        );
    }
    let set_cookie = from_query.is_some_and(|t| same(t, token));
    let mut res = next.run(req).await;
    if set_cookie {
        let cookie = format!("{COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/");
        if let Ok(v) = HeaderValue::from_str(&cookie) {
            res.headers_mut().append(header::SET_COOKIE, v);
        }
    }
    res
}

fn refused(why: &str) -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        format!("401 unauthorized: {why}\n"),
    )
        .into_response()
}

/// Compares in time independent of where the strings differ, so a caller
/// cannot find the token a byte at a time.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// The registry in Prometheus's text exposition format (version 0.0.4).
pub fn metrics_text(registry: &prometheus::Registry) -> Response {
    use prometheus::Encoder;
    let encoder = prometheus::TextEncoder::new();
    let mut out = Vec::new();
    match encoder.encode(&registry.gather(), &mut out) {
        Ok(()) => ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], out).into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("metrics could not be encoded: {e}\n"),
        )
            .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_whole() {
        assert!(same("s3cret", "s3cret"));
        assert!(!same("s3cret", "s3cre"));
        assert!(!same("s3cret", "s3creT"));
        assert!(!same("", "x"));
    }
}
