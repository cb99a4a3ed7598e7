//! The listener: HTTP/1.1 connections with a header-read timeout (a client
//! that trickles its headers is cut off), `TCP_NODELAY`, the client's
//! address for rate limits, and a graceful shutdown bounded in time.

use std::{convert::Infallible, future::Future, sync::Arc, time::Duration};

use axum::{
    Router,
    extract::{ConnectInfo, Request},
    middleware::Next,
    response::{IntoResponse, Response},
};
use entitle_jobs::config::GatewayTimeouts;
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    server::graceful::GracefulShutdown,
    service::TowerToHyperService,
};
use tokio::{net::TcpListener, sync::Semaphore};
use tower::ServiceExt as _;

use crate::error::ApiError;

/// Serves `app` on `listener` until `shutdown` resolves; then stops
/// accepting and gives open requests `timeouts.shutdown_grace_secs`.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    timeouts: &GatewayTimeouts,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(Duration::from_millis(timeouts.header_read_ms));
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (tcp, address) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: wait, do not spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // Answers go out at once: with Nagle's algorithm a response written
        // in two parts waits for the client's delayed ACK (~40 ms).
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY could not be set");
        }
        let service = app
            .clone()
            .map_request(move |mut request: Request<Incoming>| {
                request.extensions_mut().insert(ConnectInfo(address));
                request
            });
        let connection =
            http.serve_connection(TokioIo::new(tcp), TowerToHyperService::new(service));
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, client = %address, "connection ended");
            }
        });
    }
    drop(listener);
    let grace = Duration::from_secs(timeouts.shutdown_grace_secs);
    tracing::info!(grace_secs = grace.as_secs(), "gateway draining");
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            grace_secs = grace.as_secs(),
            "requests still open after the shutdown grace period were cut off"
        );
    }
    Ok(())
}

/// At most this many requests at once through a layer; the rest are refused
/// at once with 503 `overloaded` (queueing them would only make every
/// answer late).
#[derive(Clone)]
pub struct InFlight {
    permits: Arc<Semaphore>,
    what: &'static str,
    /// Only requests under this path count (`None`: all).
    under: Option<&'static str>,
}

impl InFlight {
    pub fn new(limit: usize, what: &'static str) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(limit.max(1))),
            what,
            under: None,
        }
    }

    /// A limit of its own for the requests under `prefix`.
    pub fn under(prefix: &'static str, limit: usize, what: &'static str) -> Self {
        Self {
            under: Some(prefix),
            ..Self::new(limit, what)
        }
    }
}

pub async fn limit_in_flight(
    axum::extract::State(limit): axum::extract::State<InFlight>,
    request: Request,
    next: Next,
) -> Result<Response, Infallible> {
    if let Some(prefix) = limit.under
        && !request.uri().path().starts_with(prefix)
    {
        return Ok(next.run(request).await);
    }
    let Ok(_permit) = limit.permits.clone().try_acquire_owned() else {
        metrics::counter!("entitle_gateway_overloaded_total", "limit" => limit.what).increment(1);
        return Ok(ApiError::new(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            format!("too many {} requests at once; retry shortly", limit.what),
        )
        .retry_after(1)
        .into_response());
    };
    Ok(next.run(request).await)
}
