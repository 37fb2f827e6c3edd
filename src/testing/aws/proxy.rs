//! A fault-injecting HTTP/1.1 proxy in front of moto that counts what reaches it:
//! throttling, RequestInProgress, connections dropped before or after forwarding, slow
//! answers. moto ignores IdempotencyToken, so the proxy plays AWS's dedupe.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

/// What the proxy does to the next calls.
#[derive(Default)]
pub struct Faults {
    /// The next N IssueCertificate calls get ThrottlingException.
    pub throttle_issue: u32,
    /// Every IssueCertificate call gets ThrottlingException.
    pub throttle_issue_always: bool,
    /// The next N GetCertificate calls get RequestInProgressException.
    pub in_progress: u32,
    /// Every GetCertificate call gets RequestInProgressException.
    pub in_progress_always: bool,
    /// The next N IssueCertificate calls reach moto, but the connection is dropped before
    /// the answer (the call was issued; the client cannot know).
    pub reset_issue_after_forward: u32,
    /// The next N GetCertificate calls: connection dropped before anything is forwarded.
    pub reset_get: u32,
    /// Every answer is delayed this long.
    pub delay: Duration,
}

/// What reached the proxy (and moto), for the test's assertions.
#[derive(Default)]
pub struct Stats {
    /// IssueCertificate calls received, by IdempotencyToken.
    pub received: HashMap<String, u32>,
    /// IssueCertificate calls that reached moto, by IdempotencyToken.
    pub forwarded: HashMap<String, u32>,
    /// When each forwarded IssueCertificate reached moto.
    pub forward_times: Vec<Instant>,
    /// GetCertificate calls received.
    pub get_calls: u32,
    /// Access key ids that signed the requests (SigV4 `Credential=`).
    pub access_keys: std::collections::HashSet<String>,
}

/// The proxy's state, shared with its connections.
struct ProxyState {
    upstream: String,
    http: reqwest::Client,
    faults: Mutex<Faults>,
    stats: Mutex<Stats>,
    /// AWS dedupes IssueCertificate by IdempotencyToken; moto does not, so the proxy does.
    answered: Mutex<HashMap<String, (u16, Vec<u8>)>>,
}

/// A running proxy; its accept loop lives as long as the test's runtime.
pub struct Proxy {
    /// Its endpoint, for the bridge's `endpoint` override.
    pub url: String,
    state: Arc<ProxyState>,
}

impl Proxy {
    /// Proxies to `upstream` (moto's URL) from a fresh loopback port, with no faults.
    pub async fn start(upstream: &str) -> Proxy {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = l.local_addr().unwrap();
        let state = Arc::new(ProxyState {
            upstream: upstream.to_string(),
            // A fresh connection per call: moto's server closes idle keep-alive connections
            // in a way that races with reuse.
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(0)
                .build()
                .unwrap(),
            faults: Mutex::new(Faults::default()),
            stats: Mutex::new(Stats::default()),
            answered: Mutex::new(HashMap::new()),
        });
        let st = state.clone();
        tokio::spawn(async move {
            while let Ok((sock, _)) = l.accept().await {
                tokio::spawn(serve_conn(sock, st.clone()));
            }
        });
        Proxy {
            url: format!("http://{addr}"),
            state,
        }
    }

    /// What the proxy does to the next calls (replacing the previous faults).
    pub fn faults(&self, f: Faults) {
        *self.state.faults.lock().unwrap() = f;
    }

    /// What reached the proxy since the last call (and resets it).
    pub fn take_stats(&self) -> Stats {
        std::mem::take(&mut *self.state.stats.lock().unwrap())
    }
}

/// Reads one HTTP/1.1 request (Content-Length bodies only): (lower-cased headers, body).
async fn read_request(
    sock: &mut TcpStream,
    buf: &mut Vec<u8>,
) -> Option<(Vec<(String, String)>, Vec<u8>)> {
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 8192];
        let n = sock.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let headers: Vec<(String, String)> = head
        .split("\r\n")
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let len: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .map(|(_, v)| v.parse().unwrap())
        .unwrap_or(0);
    while buf.len() < head_end + len {
        let mut chunk = [0u8; 8192];
        let n = sock.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = buf[head_end..head_end + len].to_vec();
    buf.drain(..head_end + len);
    Some((headers, body))
}

async fn respond(sock: &mut TcpStream, status: u16, body: &[u8]) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status} X\r\ncontent-type: application/x-amz-json-1.1\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    sock.write_all(head.as_bytes()).await?;
    sock.write_all(body).await
}

fn aws_error(kind: &str) -> Vec<u8> {
    serde_json::to_vec(
        &serde_json::json!({"__type": kind, "message": "injected by the test proxy"}),
    )
    .unwrap()
}

async fn forward(st: &ProxyState, headers: &[(String, String)], body: Vec<u8>) -> (u16, Vec<u8>) {
    let mut req = st.http.post(&st.upstream).body(body);
    for (k, v) in headers {
        if !matches!(k.as_str(), "host" | "content-length" | "connection") {
            req = req.header(k, v);
        }
    }
    let resp = req
        .send()
        .await
        .unwrap_or_else(|e| panic!("moto does not answer: {e:?}"));
    let status = resp.status().as_u16();
    (status, resp.bytes().await.unwrap().to_vec())
}

async fn serve_conn(mut sock: TcpStream, st: Arc<ProxyState>) {
    let mut buf = Vec::new();
    while let Some((headers, body)) = read_request(&mut sock, &mut buf).await {
        let target = headers
            .iter()
            .find(|(k, _)| k == "x-amz-target")
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        let op = target.strip_prefix("ACMPrivateCA.").unwrap_or("");
        if let Some(key) = headers
            .iter()
            .find(|(k, _)| k == "authorization")
            .and_then(|(_, v)| v.split("Credential=").nth(1))
            .and_then(|c| c.split('/').next())
        {
            st.stats.lock().unwrap().access_keys.insert(key.to_string());
        }
        let delay = st.faults.lock().unwrap().delay;
        tokio::time::sleep(delay).await;
        let answer = match op {
            "IssueCertificate" => {
                let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
                let token = json["IdempotencyToken"].as_str().unwrap_or("").to_string();
                *st.stats
                    .lock()
                    .unwrap()
                    .received
                    .entry(token.clone())
                    .or_default() += 1;
                let (throttle, reset) = {
                    let mut f = st.faults.lock().unwrap();
                    if f.throttle_issue_always || f.throttle_issue > 0 {
                        f.throttle_issue = f.throttle_issue.saturating_sub(1);
                        (true, false)
                    } else if f.reset_issue_after_forward > 0 {
                        f.reset_issue_after_forward -= 1;
                        (false, true)
                    } else {
                        (false, false)
                    }
                };
                if throttle {
                    (400, aws_error("ThrottlingException"))
                } else {
                    let cached = st.answered.lock().unwrap().get(&token).cloned();
                    let answer = match cached {
                        Some(a) if !token.is_empty() => a,
                        _ => {
                            {
                                let mut s = st.stats.lock().unwrap();
                                *s.forwarded.entry(token.clone()).or_default() += 1;
                                s.forward_times.push(Instant::now());
                            }
                            let a = forward(&st, &headers, body).await;
                            if a.0 == 200 && !token.is_empty() {
                                st.answered.lock().unwrap().insert(token, a.clone());
                            }
                            a
                        }
                    };
                    if reset {
                        return; // drop the connection: the answer is lost
                    }
                    answer
                }
            }
            "GetCertificate" => {
                st.stats.lock().unwrap().get_calls += 1;
                let action = {
                    let mut f = st.faults.lock().unwrap();
                    if f.reset_get > 0 {
                        f.reset_get -= 1;
                        "reset"
                    } else if f.in_progress_always || f.in_progress > 0 {
                        f.in_progress = f.in_progress.saturating_sub(1);
                        "in_progress"
                    } else {
                        "forward"
                    }
                };
                match action {
                    "reset" => return,
                    "in_progress" => (400, aws_error("RequestInProgressException")),
                    _ => forward(&st, &headers, body).await,
                }
            }
            _ => forward(&st, &headers, body).await,
        };
        if respond(&mut sock, answer.0, &answer.1).await.is_err() {
            return;
        }
    }
}

/// The one IssueCertificate token of a call and how often it was (received, forwarded).
pub fn one_token(s: &Stats) -> (u32, u32) {
    assert_eq!(
        s.received.len(),
        1,
        "one request, one token: {:?}",
        s.received
    );
    let (token, received) = s.received.iter().next().unwrap();
    assert!(token.len() <= 36 && !token.is_empty(), "{token:?}");
    (*received, s.forwarded.get(token).copied().unwrap_or(0))
}
