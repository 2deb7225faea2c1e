//! HTTP responses: small JSON answers built whole, and the streaming body of Server-Sent Events.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use hyper::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use hyper::StatusCode;
use tokio::sync::mpsc;

/// A response body: whole, or a stream of chunks (SSE) fed by a task through a small channel, so the task
/// waits while the client is slow.
pub(crate) enum Body {
    Full(Option<Bytes>),
    Stream(mpsc::Receiver<Bytes>),
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            Body::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Body::Stream(rx) => rx.poll_recv(cx).map(|c| c.map(|c| Ok(Frame::data(c)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, Body::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Body::Stream(_) => SizeHint::default(),
        }
    }
}

pub(crate) type HttpResponse = hyper::Response<Body>;

/// A whole response under construction.
pub(crate) struct Response {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub body: String,
}

impl Response {
    pub fn json(status: u16, body: String) -> Response {
        Response {
            status,
            headers: vec![("content-type", "application/json".into())],
            body,
        }
    }

    /// `{"type":"error","code":..,"message":..}` with the given status.
    pub fn error(status: u16, code: &str, message: &str) -> Response {
        Response::json(status, crate::messages::error(code, message, None))
    }

    pub fn not_modified() -> Response {
        Response {
            status: 304,
            headers: Vec::new(),
            body: String::new(),
        }
    }

    pub fn header(mut self, name: &'static str, value: impl Into<String>) -> Response {
        self.headers.push((name, value.into()));
        self
    }

    /// The response as bytes on the wire, closing the connection (for answers written outside hyper).
    pub fn to_wire(&self) -> Vec<u8> {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut out = format!(
            "HTTP/1.1 {} {}\r\n",
            status.as_u16(),
            status.canonical_reason().unwrap_or("")
        );
        for (name, value) in &self.headers {
            out.push_str(&format!("{name}: {value}\r\n"));
        }
        out.push_str(&format!(
            "content-length: {}\r\nconnection: close\r\n\r\n",
            self.body.len()
        ));
        out.push_str(&self.body);
        out.into_bytes()
    }

    pub fn into_http(self) -> HttpResponse {
        let body = if self.body.is_empty() {
            Body::Full(None)
        } else {
            Body::Full(Some(Bytes::from(self.body)))
        };
        let mut r = hyper::Response::new(body);
        *r.status_mut() = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let h = r.headers_mut();
        for (name, value) in self.headers {
            if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_str(&value)) {
                h.append(n, v);
            }
        }
        r
    }
}

/// A streaming `text/event-stream` response; the connection closes when the stream ends.
pub(crate) fn event_stream(rx: mpsc::Receiver<Bytes>) -> HttpResponse {
    let mut r = hyper::Response::new(Body::Stream(rx));
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert("cache-control", HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    h.insert("connection", HeaderValue::from_static("close"));
    r
}
