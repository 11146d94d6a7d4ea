//! HTTP plumbing both listeners share: Matrix JSON errors for every refusal, and bearer
//! tokens read the same way.

use axum::body::to_bytes;
use axum::extract::Request;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use ruma::api::error::{ErrorKind, StandardErrorBody};

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
}
