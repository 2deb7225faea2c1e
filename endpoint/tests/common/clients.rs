//! Blocking test clients: raw HTTP requests, WebSocket (tungstenite) helpers, metrics scraping.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use serde_json::Value;

pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// Sends a raw request and reads one whole response: by Content-Length when there is one (the connection may
/// stay open: keep-alive), else to the end of the connection.
pub fn raw_request(addr: SocketAddr, request: &str) -> HttpResponse {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    read_response(&mut s)
}

/// Reads one response from a stream (see [`raw_request`]).
pub fn read_response(s: &mut impl Read) -> HttpResponse {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(1) => buf.push(byte[0]),
            _ => break,
        }
    }
    let head = parse_response(&buf);
    let length = head.header("content-length").and_then(|l| l.parse::<usize>().ok());
    let bodiless = head.status == 304 || head.status == 204 || head.status < 200;
    let mut body = Vec::new();
    match (length, bodiless) {
        (_, true) => {}
        (Some(n), _) => {
            body.resize(n, 0);
            let _ = s.read_exact(&mut body);
        }
        (None, _) => {
            let _ = s.read_to_end(&mut body);
        }
    }
    HttpResponse {
        body: String::from_utf8_lossy(&body).to_string(),
        ..head
    }
}

/// Sends a request and reads only the response head (for responses that keep the connection, such as 101).
pub fn request_head(addr: SocketAddr, request: &str) -> HttpResponse {
    open_request(addr, request).1
}

/// Sends a request and reads the response head, leaving the connection open (a stream goes on).
pub fn open_request(addr: SocketAddr, request: &str) -> (TcpStream, HttpResponse) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut byte).unwrap(), 1, "connection closed in the head");
        buf.push(byte[0]);
    }
    (s, parse_response(&buf))
}

pub fn parse_response(buf: &[u8]) -> HttpResponse {
    let text = String::from_utf8_lossy(buf).to_string();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no response head in {text:?}"));
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
        .collect();
    HttpResponse {
        status,
        headers,
        body: body.to_string(),
    }
}

pub fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> HttpResponse {
    let mut req = format!("GET {path} HTTP/1.1\r\n");
    if !headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("host")) {
        req.push_str(&format!("Host: {addr}\r\n"));
    }
    for (n, v) in headers {
        req.push_str(&format!("{n}: {v}\r\n"));
    }
    req.push_str("\r\n");
    raw_request(addr, &req)
}

pub type Ws = tungstenite::WebSocket<TcpStream>;

pub fn ws_connect(addr: SocketAddr, path: &str) -> Ws {
    let stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let (ws, resp) = tungstenite::client(format!("ws://{addr}{path}"), stream).expect("handshake");
    assert_eq!(resp.status().as_u16(), 101);
    ws
}

pub enum Got {
    Json(Value),
    Closed(Option<(u16, String)>),
    Timeout,
}

/// The next JSON message, close, or timeout; pings and pongs skipped.
pub fn ws_next(ws: &mut Ws, within: Duration) -> Got {
    let deadline = Instant::now() + within;
    loop {
        match ws.read() {
            Ok(tungstenite::Message::Text(t)) => return Got::Json(serde_json::from_str(&t).unwrap()),
            Ok(tungstenite::Message::Close(f)) => {
                return Got::Closed(f.map(|f| (u16::from(f.code), f.reason.to_string())))
            }
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) =>
            {
                if Instant::now() >= deadline {
                    return Got::Timeout;
                }
            }
            Err(_) => return Got::Closed(None),
        }
    }
}

pub fn ws_json(ws: &mut Ws) -> Value {
    match ws_next(ws, Duration::from_secs(5)) {
        Got::Json(v) => v,
        Got::Closed(c) => panic!("closed: {c:?}"),
        Got::Timeout => panic!("no message within 5 s"),
    }
}

/// The next message that is not a checkpoint.
pub fn ws_json_skip_checkpoints(ws: &mut Ws) -> Value {
    loop {
        let v = ws_json(ws);
        if v["type"] != "checkpoint" {
            return v;
        }
    }
}

pub fn ws_send(ws: &mut Ws, v: &Value) {
    ws.send(tungstenite::Message::text(v.to_string())).unwrap();
}

/// Waits for the close frame, returning (code, reason) and how long it took.
pub fn ws_close_code(ws: &mut Ws, within: Duration) -> (Option<(u16, String)>, Duration) {
    let t = Instant::now();
    loop {
        match ws_next(ws, within.saturating_sub(t.elapsed())) {
            Got::Json(_) => continue,
            Got::Closed(c) => return (c, t.elapsed()),
            Got::Timeout => panic!("no close within {within:?}"),
        }
    }
}

pub fn wait_until(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    f()
}

pub fn metric(addr: SocketAddr, name: &str) -> u64 {
    let body = get(addr, "/metrics", &[]).body;
    body.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("{name} missing in {body}"))
        .trim()
        .parse()
        .unwrap()
}

/// Sends a subscribe and expects `subscribed`.
pub fn subscribe(ws: &mut Ws, body: Value) -> Value {
    ws_send(ws, &body);
    let v = ws_json_skip_checkpoints(ws);
    assert_eq!(v["type"], "subscribed", "{v}");
    v
}

/// Reads change messages until `n` arrived (checkpoints skipped), failing on anything else.
pub fn read_changes(ws: &mut Ws, n: usize) -> Vec<Value> {
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while out.len() < n {
        assert!(Instant::now() < deadline, "only {} of {n} changes arrived", out.len());
        match ws_next(ws, Duration::from_secs(5)) {
            Got::Json(v) if v["type"] == "change" => out.push(v),
            Got::Json(v) if v["type"] == "checkpoint" => {}
            Got::Json(v) => panic!("unexpected {v}"),
            Got::Closed(c) => panic!("closed {c:?}"),
            Got::Timeout => panic!("timeout after {} of {n} changes", out.len()),
        }
    }
    out
}

/// (event_id, seq) of change objects.
pub fn ids(changes: &[Value]) -> Vec<(u64, i64)> {
    changes
        .iter()
        .map(|c| (c["event_id"].as_u64().unwrap(), c["seq"].as_i64().unwrap()))
        .collect()
}
