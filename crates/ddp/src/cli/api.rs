//! Talking to a server: requests with the token, and errors that carry the server's reason.

use std::fmt;

use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde_json::Value;

/// A failure to print: the server's reason and message, or what went wrong on the way.
#[derive(Debug)]
pub struct Failure {
    /// `UPPER_SNAKE_CASE` reason from the server, when it answered with one.
    pub reason: Option<String>,
    /// The message.
    pub message: String,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.reason {
            Some(r) => write!(f, "{r}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for Failure {}

impl Failure {
    pub fn new(message: impl Into<String>) -> Failure {
        Failure { reason: None, message: message.into() }
    }
}

/// A server and the token to use with it.
pub struct Api {
    pub server: url::Url,
    token: String,
    http: reqwest::Client,
}

impl Api {
    pub fn new(server: &str, token: String) -> Result<Api, Failure> {
        let server =
            url::Url::parse(server).map_err(|e| Failure::new(format!("--server {server:?} is not a URL: {e}")))?;
        if !matches!(server.scheme(), "http" | "https") {
            return Err(Failure::new(format!("--server must be http:// or https://, got {server}")));
        }
        let http = reqwest::Client::builder()
            .user_agent(concat!("ddp-cli/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| Failure::new(format!("cannot build an HTTP client: {e}")))?;
        Ok(Api { server, token, http })
    }

    /// The token (for WebSocket requests).
    pub fn token(&self) -> &str {
        &self.token
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.server.as_str().trim_end_matches('/'))
    }

    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.http.request(method, self.url(path)).header("Authorization", format!("ModeCloud {}", self.token))
    }

    /// Sends and checks the answer: a 2xx response, or the server's error as a [`Failure`].
    pub async fn send(&self, request: RequestBuilder) -> Result<Response, Failure> {
        let response = request.send().await.map_err(|e| Failure::new(format!("cannot reach {}: {e}", self.server)))?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        Err(Failure {
            reason: body["reason"].as_str().map(str::to_owned).or_else(|| Some(status_reason(status))),
            message: body["message"].as_str().map_or_else(|| format!("the server answered {status}"), str::to_owned),
        })
    }

    /// Sends and reads a JSON answer.
    pub async fn json(&self, request: RequestBuilder) -> Result<Value, Failure> {
        let response = self.send(request).await?;
        response.json().await.map_err(|e| Failure::new(format!("the server's answer is not JSON: {e}")))
    }
}

fn status_reason(status: StatusCode) -> String {
    format!("HTTP_{}", status.as_u16())
}

/// The rev in a response's ETag.
pub fn etag_rev(response: &Response) -> Option<u64> {
    response.headers().get("etag")?.to_str().ok()?.trim_matches('"').parse().ok()
}
