//! HTTP plumbing both listeners share: how they are served (bounded), Matrix JSON errors
//! for every refusal, and bearer tokens read the same way.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use axum::body::to_bytes;
use axum::extract::Request;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use ruma::api::error::{ErrorKind, StandardErrorBody};

/// What one listener allows its clients.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// A client that has not sent a request's headers within this is disconnected (an
    /// idle keep-alive connection too): a slow or silent client cannot hold a connection.
    pub header_read_timeout: Duration,
    /// A request's whole body must arrive within this of the request being read: a client
    /// that drips its body cannot hold a connection either.
    pub body_read_timeout: Duration,
    /// Connections served at once; more wait in the kernel's accept queue.
    pub max_connections: usize,
}

impl Limits {
    pub const DEFAULT: Limits = Limits {
        header_read_timeout: Duration::from_secs(30),
        body_read_timeout: Duration::from_secs(60),
        max_connections: 256,
    };
}

/// How long open connections get to finish their requests at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Serves `router` on `listener` (HTTP/1.1) until `shutdown`, then lets open requests finish
/// for a few seconds. Unlike `axum::serve`, bounded by `limits`.
pub async fn serve(
    listener: TcpListener,
    router: axum::Router,
    limits: Limits,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            permit = connections.clone().acquire_owned() => {
                permit.expect("the semaphore is never closed")
            }
        };
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) if is_connection_error(&error) => continue,
                Err(error) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!(%error, "cannot accept a connection; retrying in 1 s");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            },
        };
        let body_read_timeout = limits.body_read_timeout;
        let service =
            router
                .clone()
                .map_request(move |request: hyper::Request<hyper::body::Incoming>| {
                    request
                        .map(|body| axum::body::Body::new(Deadline::new(body, body_read_timeout)))
                });
        let service = TowerToHyperService::new(service);
        let connection = http1.serve_connection(TokioIo::new(stream), service);
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            // A client that goes away or sends garbage ends only its own connection.
            let _ = connection.await;
            drop(permit);
        });
    }
    drop(listener);
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown()).await;
    Ok(())
}

/// A request body that fails with [`BodyTimeout`] once its deadline has passed. The timer
/// is only armed when the body is not already there, so a body that arrives in one piece
/// costs nothing.
struct Deadline<B> {
    inner: B,
    deadline: Instant,
    timeout: Duration,
    timer: Option<Pin<Box<Sleep>>>,
}

impl<B> Deadline<B> {
    fn new(inner: B, timeout: Duration) -> Deadline<B> {
        Deadline {
            inner,
            deadline: Instant::now() + timeout,
            timeout,
            timer: None,
        }
    }
}

impl<B> HttpBody for Deadline<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<axum::BoxError>,
{
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::BoxError>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        let deadline = self.deadline;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(BodyTimeout(self.timeout).into()))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A request body that did not arrive in time (see [`Limits::body_read_timeout`]).
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within {0:?}")]
pub struct BodyTimeout(Duration);

/// Reads a whole request body of at most `limit` bytes.
pub async fn read_body(body: axum::body::Body, limit: usize) -> Result<Bytes, BodyError> {
    let limited = http_body_util::Limited::new(body, limit);
    match limited.collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) => {
            let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&*error);
            while let Some(e) = cause {
                if e.is::<http_body_util::LengthLimitError>() {
                    return Err(BodyError::TooLarge { limit });
                }
                if let Some(timeout) = e.downcast_ref::<BodyTimeout>() {
                    return Err(BodyError::Timeout(timeout.0));
                }
                cause = e.source();
            }
            Err(BodyError::Read(crate::error_chain(&*error)))
        }
    }
}

/// Why a request body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("the body exceeds {limit} bytes")]
    TooLarge { limit: usize },
    #[error("the body did not arrive within {0:?}; send it at once")]
    Timeout(Duration),
    #[error("cannot read the request body: {0}")]
    Read(String),
}

impl BodyError {
    /// The answer for a request whose body could not be read; `limit_key` names the
    /// setting behind the size limit.
    pub fn rejection(&self, limit_key: &str) -> Rejection {
        match self {
            BodyError::TooLarge { limit } => Rejection::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                ErrorKind::TooLarge,
                format!("the request body exceeds {limit} bytes ({limit_key})"),
            ),
            BodyError::Timeout(_) => Rejection::new(
                StatusCode::REQUEST_TIMEOUT,
                ErrorKind::Unknown,
                self.to_string(),
            ),
            BodyError::Read(_) => Rejection::new(
                StatusCode::BAD_REQUEST,
                ErrorKind::Unknown,
                self.to_string(),
            ),
        }
    }
}

/// Errors of one incoming connection (not of the listener): skip it.
fn is_connection_error(error: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        error.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    )
}

/// A Matrix error response: `{"errcode": ..., "error": ...}` with `status`.
pub fn matrix_error(status: StatusCode, kind: ErrorKind, message: impl Into<String>) -> Response {
    Rejection::new(status, kind, message).into_response()
}

/// A refused request, kept small until it becomes a response.
pub struct Rejection(Box<(StatusCode, StandardErrorBody)>);

impl Rejection {
    pub fn new(status: StatusCode, kind: ErrorKind, message: impl Into<String>) -> Rejection {
        Rejection(Box::new((
            status,
            StandardErrorBody::new(kind, message.into()),
        )))
    }
}

impl IntoResponse for Rejection {
    fn into_response(self) -> Response {
        let (status, body) = *self.0;
        (status, axum::Json(body)).into_response()
    }
}

/// Turns any error answer that is not JSON (axum's own rejections: a bad path, a wrong
/// method) into a Matrix JSON error, so every listener speaks one error format.
pub async fn json_errors(response: Response) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let text = to_bytes(response.into_body(), 4096)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
        .unwrap_or_default();
    let message = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_owned()
    } else {
        text
    };
    let kind = match status {
        StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED => ErrorKind::Unrecognized,
        StatusCode::UNAUTHORIZED => ErrorKind::MissingToken,
        StatusCode::FORBIDDEN => ErrorKind::Forbidden,
        StatusCode::PAYLOAD_TOO_LARGE => ErrorKind::TooLarge,
        StatusCode::BAD_REQUEST | StatusCode::UNSUPPORTED_MEDIA_TYPE => ErrorKind::BadJson,
        _ => ErrorKind::Unknown,
    };
    matrix_error(status, kind, message)
}

/// The token of an `Authorization: Bearer` header; the scheme is case-insensitive.
pub fn bearer_token(request: &Request) -> Option<&str> {
    let value = request
        .headers()
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;

    #[test]
    fn should_read_the_bearer_scheme_case_insensitively() {
        for header in ["Bearer tok", "bearer tok", "BEARER  tok "] {
            let request = Request::builder()
                .header(header::AUTHORIZATION, header)
                .body(Body::empty())
                .unwrap();
            assert_eq!(bearer_token(&request), Some("tok"), "{header:?}");
        }
        for header in ["Basic tok", "Bearer", "tok"] {
            let request = Request::builder()
                .header(header::AUTHORIZATION, header)
                .body(Body::empty())
                .unwrap();
            assert_eq!(bearer_token(&request), None, "{header:?}");
        }
    }

    #[tokio::test]
    async fn should_turn_plain_error_answers_into_matrix_errors() {
        let plain = (StatusCode::METHOD_NOT_ALLOWED, "").into_response();
        let answer = json_errors(plain).await;
        assert_eq!(answer.status(), StatusCode::METHOD_NOT_ALLOWED);
        let body = to_bytes(answer.into_body(), 1024).await.unwrap();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["errcode"], "M_UNRECOGNIZED");
        assert_eq!(body["error"], "Method Not Allowed");
        let ok = json_errors((StatusCode::OK, "fine").into_response()).await;
        assert_eq!(ok.status(), StatusCode::OK);
    }

    /// `router` served with `limits` on a loopback port, until `stop`.
    struct Served {
        at: std::net::SocketAddr,
        shutdown: CancellationToken,
        server: tokio::task::JoinHandle<std::io::Result<()>>,
    }

    impl Served {
        async fn start(router: axum::Router, limits: Limits) -> Served {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let at = listener.local_addr().unwrap();
            let shutdown = CancellationToken::new();
            let server = tokio::spawn(serve(listener, router, limits, shutdown.clone()));
            Served {
                at,
                shutdown,
                server,
            }
        }

        async fn connect(&self, first_bytes: &[u8]) -> tokio::net::TcpStream {
            use tokio::io::AsyncWriteExt;
            let mut stream = tokio::net::TcpStream::connect(self.at).await.unwrap();
            stream.write_all(first_bytes).await.unwrap();
            stream
        }

        async fn stop(self) {
            self.shutdown.cancel();
            tokio::time::timeout(Duration::from_secs(60), self.server)
                .await
                .expect("serve returns at shutdown")
                .unwrap()
                .unwrap();
        }
    }

    /// Everything `stream` receives until it is closed; `Err` if it was reset.
    async fn read_until_closed(
        stream: &mut tokio::net::TcpStream,
        what: &str,
    ) -> std::io::Result<String> {
        use tokio::io::AsyncReadExt;
        let mut bytes = Vec::new();
        tokio::time::timeout(Duration::from_secs(60), stream.read_to_end(&mut bytes))
            .await
            .unwrap_or_else(|_| panic!("{what}"))?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// A silent client holding the only connection slot is dropped once its headers are
    /// late, and the client waiting behind it is served. Without the timeout the second
    /// client would wait forever.
    #[tokio::test]
    async fn should_drop_a_silent_client_and_serve_the_one_behind_it() {
        let router = axum::Router::new().route("/health", axum::routing::get(|| async { "ok\n" }));
        let limits = Limits {
            header_read_timeout: Duration::from_millis(300),
            max_connections: 1,
            ..Limits::DEFAULT
        };
        let served = Served::start(router, limits).await;

        let mut silent = served.connect(b"GET /health HTTP/1.1\r\n").await;
        let mut waiting = served
            .connect(b"GET /health HTTP/1.1\r\nHost: roster\r\nConnection: close\r\n\r\n")
            .await;
        let answer = read_until_closed(
            &mut waiting,
            "the waiting client is served once the silent one is dropped",
        )
        .await
        .unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with("ok\n"), "{answer}");
        // Closed (a 408 first, or not) or reset: either way never answered 200.
        if let Ok(rest) = read_until_closed(&mut silent, "the silent client is disconnected").await
        {
            assert!(!rest.contains(" 200 "), "{rest:?}");
        }
        served.stop().await;
    }

    /// A client that sends its headers and then only part of its body is answered 408 once
    /// the body deadline passes, and its connection is closed; a body sent at once is read.
    #[tokio::test]
    async fn should_answer_408_to_a_body_that_does_not_arrive_in_time() {
        async fn echo_length(request: Request) -> Response {
            match read_body(request.into_body(), 1024).await {
                Ok(bytes) => format!("{} bytes\n", bytes.len()).into_response(),
                Err(error) => error.rejection("test.limit").into_response(),
            }
        }
        let router = axum::Router::new().route("/body", axum::routing::put(echo_length));
        let limits = Limits {
            body_read_timeout: Duration::from_millis(300),
            ..Limits::DEFAULT
        };
        let served = Served::start(router, limits).await;

        let mut dripping = served
            .connect(b"PUT /body HTTP/1.1\r\nHost: roster\r\nContent-Length: 100\r\n\r\n0123456789")
            .await;
        let answer = read_until_closed(
            &mut dripping,
            "the dripping client is answered and disconnected",
        )
        .await
        .unwrap();
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        assert!(answer.contains("did not arrive within"), "{answer}");

        let mut prompt = served
            .connect(b"PUT /body HTTP/1.1\r\nHost: roster\r\nContent-Length: 10\r\nConnection: close\r\n\r\n0123456789")
            .await;
        let answer = read_until_closed(&mut prompt, "a body sent at once is answered")
            .await
            .unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with("10 bytes\n"), "{answer}");
        served.stop().await;
    }
}
