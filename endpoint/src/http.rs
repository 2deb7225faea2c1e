//! HTTP/1.1 request heads and responses, by hand on top of `httparse`.
//!
//! Only what the endpoint needs: one request per connection (`Connection: close`), GET only, no request
//! bodies. The head must fit in [`MAX_HEAD`] bytes and arrive within the header timeout (slowloris).

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{timeout, timeout_at, Instant};

/// Largest request head accepted; beyond it: 431.
pub(crate) const MAX_HEAD: usize = 16 * 1024;
const MAX_HEADERS: usize = 64;
/// Time allowed for writing a whole response.
pub(crate) const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) struct Head {
    pub method: String,
    pub path: String,
    pub query: String,
    /// Names lower-cased.
    pub headers: Vec<(String, String)>,
    /// Bytes read past the head (a WebSocket client may send its first frame right away).
    pub leftover: Vec<u8>,
}

pub(crate) enum HeadError {
    Timeout,
    TooLarge,
    Bad(String),
    Closed,
}

impl Head {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    /// Whether a comma-separated header (`Connection: keep-alive, Upgrade`) holds `token`, case-insensitively.
    pub fn has_token(&self, name: &str, token: &str) -> bool {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .any(|(_, v)| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    }
}

/// Reads one request head, giving up at `limit` after the start.
pub(crate) async fn read_head(stream: &mut TcpStream, limit: Duration) -> Result<Head, HeadError> {
    let deadline = Instant::now() + limit;
    let mut buf: Vec<u8> = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        let n = match timeout_at(deadline, stream.read(&mut chunk)).await {
            Err(_) => return Err(HeadError::Timeout),
            Ok(Err(_)) | Ok(Ok(0)) => return Err(HeadError::Closed),
            Ok(Ok(n)) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(len)) if len <= MAX_HEAD => {
                let target = req.path.unwrap_or("/");
                let (path, query) = target.split_once('?').unwrap_or((target, ""));
                return Ok(Head {
                    method: req.method.unwrap_or("").to_string(),
                    path: path.to_string(),
                    query: query.to_string(),
                    headers: req
                        .headers
                        .iter()
                        .map(|h| {
                            (
                                h.name.to_ascii_lowercase(),
                                String::from_utf8_lossy(h.value).trim().to_string(),
                            )
                        })
                        .collect(),
                    leftover: buf[len..].to_vec(),
                });
            }
            Ok(httparse::Status::Complete(_)) | Err(httparse::Error::TooManyHeaders) => {
                return Err(HeadError::TooLarge)
            }
            Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => return Err(HeadError::TooLarge),
            Ok(httparse::Status::Partial) => {}
            Err(e) => return Err(HeadError::Bad(e.to_string())),
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        101 => "Switching Protocols",
        200 => "OK",
        304 => "Not Modified",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        410 => "Gone",
        426 => "Upgrade Required",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// A complete response with `Content-Length` and `Connection: close`.
pub(crate) struct Response {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub body: String,
}

impl Response {
    pub fn json(status: u16, body: String) -> Response {
        Response {
            status,
            headers: vec![("Content-Type", "application/json".into())],
            body,
        }
    }

    /// `{"type":"error","code":..,"message":..}` with the given status.
    pub fn error(status: u16, code: &str, message: &str) -> Response {
        Response::json(status, crate::messages::error(code, message, None))
    }

    pub fn header(mut self, name: &'static str, value: impl Into<String>) -> Response {
        self.headers.push((name, value.into()));
        self
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut head = format!("HTTP/1.1 {} {}\r\n", self.status, reason(self.status));
        for (n, v) in &self.headers {
            head.push_str(&format!("{n}: {v}\r\n"));
        }
        if self.status != 304 {
            head.push_str(&format!("Content-Length: {}\r\n", self.body.len()));
        }
        head.push_str("Connection: close\r\n\r\n");
        let mut bytes = head.into_bytes();
        if self.status != 304 {
            bytes.extend_from_slice(self.body.as_bytes());
        }
        bytes
    }
}

/// Writes raw bytes within [`WRITE_TIMEOUT`].
pub(crate) async fn write_all(stream: &mut TcpStream, bytes: &[u8]) -> bool {
    matches!(timeout(WRITE_TIMEOUT, stream.write_all(bytes)).await, Ok(Ok(())))
}

/// Writes a response and closes the connection gracefully; true when it was written.
pub(crate) async fn respond(stream: &mut TcpStream, response: Response) -> bool {
    let ok = write_all(stream, &response.to_bytes()).await;
    finish(stream, Duration::from_millis(500)).await;
    ok
}

/// Ends the connection gracefully: our side is shut (FIN) and what the client still sends is read and dropped
/// until it closes or `linger` passes, so unread input does not turn the close into a reset that could
/// destroy the response in flight.
pub(crate) async fn finish(stream: &mut TcpStream, linger: Duration) {
    let _ = timeout(linger, stream.shutdown()).await;
    let deadline = Instant::now() + linger;
    let mut sink = [0u8; 4096];
    let mut total = 0usize;
    while total < (1 << 20) {
        match timeout_at(deadline, stream.read(&mut sink)).await {
            Ok(Ok(n)) if n > 0 => total += n,
            _ => break,
        }
    }
}
