//! OpenAI-style errors: `{"error": {"message", "type", "param", "code"}}`
//! with the HTTP status OpenAI uses for the same mistake.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// An error answer of the API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Human-readable message.
    pub message: String,
    /// OpenAI error type, such as `invalid_request_error`.
    pub kind: &'static str,
    /// The request parameter at fault, if one is.
    pub param: Option<String>,
    /// Machine-readable code, such as `model_not_found`.
    pub code: Option<&'static str>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
        }
    }

    /// 400 for a malformed or invalid request.
    pub fn invalid(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    /// 400 naming the parameter at fault.
    pub fn invalid_param(param: &str, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::invalid(message).param(param).code(code)
    }

    /// 400: the body is not JSON.
    pub fn bad_json(detail: &str) -> ApiError {
        ApiError::invalid(format!(
            "We could not parse the JSON body of your request: {detail}. The body must be a JSON object."
        ))
        .code("invalid_json")
    }

    /// 413: the body is larger than the server reads.
    pub fn too_large(limit: usize) -> ApiError {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!(
                "The request body is larger than the {limit} bytes this server reads \
                 (1 MiB plus 32 bytes per token of the model's context)."
            ),
        )
        .code("request_too_large")
    }

    /// 404: no such model here.
    pub fn unknown_model(model: &str) -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("The model `{model}` does not exist or you do not have access to it."),
        )
        .param("model")
        .code("model_not_found")
    }

    /// 401: missing or wrong API key.
    pub fn unauthorized(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, "invalid_request_error", message)
            .code("invalid_api_key")
    }

    /// 429: the request queue is full.
    pub fn queue_full(capacity: usize) -> ApiError {
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            format!("The server is busy: {capacity} requests are already queued. Retry later."),
        )
        .code("queue_full")
    }

    /// 408: the client did not send its request within the read timeout.
    pub fn read_timeout(timeout: std::time::Duration) -> ApiError {
        ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "invalid_request_error",
            format!(
                "The request body did not arrive within {:.0}s.",
                timeout.as_secs_f64()
            ),
        )
        .code("request_timeout")
    }

    /// 503: too many connections are open.
    pub fn too_many_connections(limit: usize) -> ApiError {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            format!(
                "The server holds its limit of {limit} open connections. Retry later, or reuse a connection."
            ),
        )
        .code("too_many_connections")
    }

    /// 429: every tokenizing slot stayed busy for the whole wait.
    pub fn tokenizer_busy(waited: std::time::Duration) -> ApiError {
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            format!(
                "The server is busy encoding other prompts (no slot freed within {:.0}s). Retry later.",
                waited.as_secs_f64()
            ),
        )
        .code("tokenizer_busy")
    }

    /// 503: the tensor-parallel group cannot run requests.
    pub fn unavailable(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", message)
            .code("group_unavailable")
    }

    /// 500: the engine failed.
    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
            .code("engine_error")
    }

    /// 404 for an unknown path.
    pub fn no_route(method: &str, path: &str) -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("Unknown request URL: {method} {path}."),
        )
        .code("unknown_url")
    }

    /// 405 for a known path with another method.
    pub fn wrong_method(method: &str, path: &str) -> ApiError {
        ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request_error",
            format!("{method} is not allowed on {path}."),
        )
        .code("method_not_allowed")
    }

    /// Names the parameter at fault.
    pub fn param(mut self, param: &str) -> ApiError {
        self.param = Some(param.to_owned());
        self
    }

    /// Sets the machine-readable code.
    pub fn code(mut self, code: &'static str) -> ApiError {
        self.code = Some(code);
        self
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_have_the_openai_shape() {
        let e = ApiError::unknown_model("x/y");
        let body = e.body();
        assert_eq!(e.status, StatusCode::NOT_FOUND);
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert_eq!(body["error"]["param"], "model");
        assert_eq!(body["error"]["code"], "model_not_found");
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("x/y"))
        );
        let bad = ApiError::bad_json("EOF").body();
        assert!(bad["error"]["param"].is_null());
    }
}
