//! The gateway's one error type, answered as a stable JSON body
//! `{"code": "...", "detail": "..."}`.

use axum::{
    Json,
    extract::{FromRequest, Request, rejection::JsonRejection},
    http::StatusCode,
    response::{IntoResponse, Response},
};
use serde::{Serialize, de::DeserializeOwned};

/// An error answer: an HTTP status, a stable machine-readable code, and a
/// sentence for people.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub detail: String,
    /// Seconds to wait, sent as `Retry-After` (429, 503).
    pub retry_after: Option<u64>,
}

/// Every error answer's body: the one `Error` schema of the OpenAPI
/// document, which every 4xx and 5xx response refers to.
#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = Error)]
pub struct ErrorBody {
    /// Stable and machine-readable, e.g. `code_not_found`: branch on it.
    code: &'static str,
    /// A sentence for people; its wording may change.
    detail: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, detail: impl Into<String>) -> Self {
        Self {
            status,
            code,
            detail: detail.into(),
            retry_after: None,
        }
    }

    /// Tells the client when to try again.
    pub fn retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    /// A database failure: `503 database_unavailable` with `Retry-After`
    /// while Postgres is down or busy (the client retries; nothing was
    /// done), else a failure of ours.
    pub fn database(e: &sqlx::Error) -> Self {
        if entitle_jobs::db::unavailable(e) {
            tracing::warn!(error = %e, "Postgres is unavailable; answering 503");
            metrics::counter!("entitle_database_unavailable_total").increment(1);
            return Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "database_unavailable",
                "the database is unavailable for now; try again shortly",
            )
            .retry_after(5);
        }
        if entitle_jobs::db::bad_input(e) {
            // The request carried a value Postgres cannot hold: a NUL byte,
            // a number out of range, a key too long to index.
            tracing::info!(error = %e, "a request value could not be stored");
            return Self::new(
                StatusCode::BAD_REQUEST,
                "invalid_input",
                "a value in the request cannot be stored: it holds a NUL byte, or is out of \
                 range or too long",
            );
        }
        Self::internal(e)
    }

    /// A failure of ours; the cause is logged, not answered.
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "request failed");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "something went wrong on our side; it was logged",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Json(ErrorBody {
            code: self.code,
            detail: self.detail,
        });
        let mut response = (self.status, body).into_response();
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(axum::http::header::RETRY_AFTER, seconds.into());
        }
        response
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        ApiError::database(&e)
    }
}

impl From<entitle_jobs::lifecycle::Refused> for ApiError {
    fn from(refused: entitle_jobs::lifecycle::Refused) -> Self {
        use entitle_jobs::lifecycle::Refused;
        match refused {
            Refused::NotFound(what) => ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no such {what}"),
            ),
            Refused::Conflict { code, detail } => ApiError::new(StatusCode::CONFLICT, code, detail),
            Refused::Invalid { code, detail } => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, code, detail)
            }
            Refused::Forbidden(role) => ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!("this needs the {} role", role.as_str()),
            ),
            Refused::Database(e) => ApiError::database(&e),
        }
    }
}

/// Gives every error answer the one JSON shape, whoever produced it: axum's
/// own refusals (an unparsable path id, a body over the limit, a missing
/// content type) are plain text, and a route or method the router does not
/// have answers an empty body. HTML pages (the console's) pass unchanged.
pub async fn json_errors(response: Response) -> Response {
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let content_type = response
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !(content_type.is_empty() || content_type.starts_with("text/plain")) {
        return response;
    }
    let detail = match axum::body::to_bytes(response.into_body(), 4096).await {
        Ok(bytes) if !bytes.is_empty() => String::from_utf8_lossy(&bytes).into_owned(),
        _ => status
            .canonical_reason()
            .unwrap_or("the request was refused")
            .to_lowercase(),
    };
    let code = match status {
        StatusCode::BAD_REQUEST => "bad_request",
        StatusCode::NOT_FOUND => "route_not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "body_too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::UNPROCESSABLE_ENTITY => "invalid_body",
        StatusCode::REQUEST_TIMEOUT => "body_timeout",
        StatusCode::SERVICE_UNAVAILABLE => "timeout",
        s if s.is_server_error() => "internal",
        _ => "request_refused",
    };
    ApiError::new(status, code, detail).into_response()
}

/// A JSON body whose rejection is an [`ApiError`] with code `invalid_body`.
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<T, S> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(value)) => Ok(ApiJson(value)),
            // A body over the limit says so; nothing else about it is wrong.
            Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => Err(
                ApiError::new(rejection.status(), "body_too_large", rejection.body_text()),
            ),
            Err(rejection) => Err(ApiError::new(
                match rejection {
                    JsonRejection::MissingJsonContentType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    JsonRejection::JsonDataError(_) => StatusCode::UNPROCESSABLE_ENTITY,
                    _ => StatusCode::BAD_REQUEST,
                },
                "invalid_body",
                rejection.body_text(),
            )),
        }
    }
}
