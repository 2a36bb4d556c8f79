//! Errors the API answers with: an HTTP status and a JSON body in OpenAI's error shape
//! (`{"error": {"message", "type", "param", "code"}}`, as the official clients parse it),
//! naming the field at fault in `param`. `code` is a short string naming the condition
//! (`invalid_value`, `queue_full`, ...) or null, as OpenAI's own errors carry a string or
//! null there; the HTTP status already carries the number.

use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// An error answered to a client.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// What went wrong, for a person.
    pub message: String,
    /// The request field at fault, if one is.
    pub param: Option<String>,
    /// The condition, for programs (`invalid_value`, `queue_full`, ...): see
    /// docs/serve.md for the list.
    pub code: Option<&'static str>,
    /// Seconds a client should wait before retrying (429 and 503).
    pub retry_after: Option<u64>,
    /// Sends `x-should-retry: false`: a resend would run the edit again (see
    /// [`ApiError::edit_cancelled`]).
    pub no_retry: bool,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            param: None,
            code: Some(code),
            retry_after: None,
            no_retry: false,
        }
    }

    /// 400: a field is missing or wrong.
    pub fn bad_field(param: &str, message: impl Into<String>) -> Self {
        Self {
            param: Some(param.to_string()),
            ..Self::new(StatusCode::BAD_REQUEST, "invalid_value", message)
        }
    }

    /// 400 without a single field at fault.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }

    /// 413: a field is larger than the server accepts.
    pub fn too_large(param: &str, message: impl Into<String>) -> Self {
        Self {
            param: Some(param.to_string()),
            ..Self::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", message)
        }
    }

    /// 401: the bearer token is missing or wrong (the token itself is never echoed).
    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "invalid_token",
            "missing or wrong bearer token (send `Authorization: Bearer <token>`)",
        )
    }

    /// 403: a tokenless loopback server refuses a request whose `Host` names another
    /// site (DNS rebinding: a web page's name resolved to 127.0.0.1).
    pub fn forbidden_host(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden_host", message)
    }

    /// 403: a tokenless loopback server refuses a request a web page of another origin
    /// sent (a cross-site form or fetch, which needs no preflight).
    pub fn forbidden_origin(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden_origin", message)
    }

    /// 404: no such edit or file.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// 405: the route exists but not with this method.
    pub fn method_not_allowed(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            message,
        )
    }

    /// 408: the request body did not arrive in time (the connection is closed after).
    pub fn timed_out(message: impl Into<String>) -> Self {
        Self::new(StatusCode::REQUEST_TIMEOUT, "request_timeout", message)
    }

    /// 409: the edit is not in a state that allows this.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", message)
    }

    /// 429: the queue is full.
    pub fn queue_full(depth: usize, retry_after: u64) -> Self {
        Self {
            retry_after: Some(retry_after),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "queue_full",
                format!("the queue is full ({depth} edits waiting); retry after {retry_after} s"),
            )
        }
    }

    /// 503: the server is shutting down.
    pub fn shutting_down() -> Self {
        Self {
            retry_after: Some(5),
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "shutting_down",
                "the server is shutting down and takes no new edits",
            )
        }
    }

    /// 500: something on our side failed (a journal write, an output file).
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }

    // The answers below end a request whose edit was accepted: a resend is a new edit.
    // openai-python, openai-node and the other Stainless SDKs resend 408, 409, 429 and
    // every 5xx (twice by default) unless the answer says `x-should-retry: false`, so each
    // of them says it, and uses a status outside that set where an honest one exists.

    /// 499: the edit this request waited on was cancelled (DELETE): a resend would run
    /// what someone cancelled. 499 is how Google's APIs answer a call cancelled by its
    /// caller (gRPC's CANCELLED); 409 would be resent.
    pub fn edit_cancelled(message: impl Into<String>) -> Self {
        let status = StatusCode::from_u16(499).expect("a status in 100-999");
        Self {
            no_retry: true,
            ..Self::new(status, "edit_cancelled", message)
        }
    }

    /// The edit this request waited on failed: 422 when its own values made it fail (a
    /// resend fails the same way), 500 when the server did (a resend runs the whole edit
    /// again; the client decides, knowing the id from the message).
    pub fn edit_failed(message: impl Into<String>, caused_by_request: bool) -> Self {
        let status = if caused_by_request {
            StatusCode::UNPROCESSABLE_ENTITY
        } else {
            StatusCode::INTERNAL_SERVER_ERROR
        };
        Self {
            no_retry: true,
            ..Self::new(status, "edit_failed", message)
        }
    }

    /// This error, answered for an edit that was accepted (it ran, or runs after a
    /// restart): `x-should-retry: false`, as a resend would run the edit again.
    pub fn after_acceptance(self) -> Self {
        Self {
            no_retry: true,
            ..self
        }
    }

    /// 503 without `Retry-After`: the server stops while the edit waits in the queue; it
    /// is journaled and runs after the restart, so a resend would run it twice.
    pub fn journaled_at_shutdown(message: impl Into<String>) -> Self {
        Self {
            no_retry: true,
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "journaled_at_shutdown",
                message,
            )
        }
    }

    /// The OpenAI error `type` for the status.
    fn kind(&self) -> &'static str {
        match self.status {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::NOT_FOUND => "not_found_error",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            s if s.is_server_error() => "server_error",
            _ => "invalid_request_error",
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.status.as_u16(), self.message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({
            "error": {
                "message": self.message,
                "type": self.kind(),
                "param": self.param,
                "code": self.code,
            }
        });
        let mut response = (self.status, axum::Json(body)).into_response();
        if let Some(s) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        if self.no_retry {
            response.headers_mut().insert(
                HeaderName::from_static("x-should-retry"),
                HeaderValue::from_static("false"),
            );
        }
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_edit_that_failed_by_its_own_values_is_422_and_never_resent() {
        let r = ApiError::edit_failed("edit ed_1 failed", true).into_response();
        assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(r.headers()["x-should-retry"], "false");
        let r = ApiError::edit_failed("edit ed_1 failed", false).into_response();
        assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(r.headers()["x-should-retry"], "false");
    }
}
