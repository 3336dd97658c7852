//! Plain HTTP(S) pieces shared by the Swift client and `https://` input: retries with
//! backoff, one-line errors, and a ranged reader (`HttpFetch`) for [`super::range`]'s
//! cache.
//!
//! Built on reqwest, the HTTP client OpenDAL itself uses (rustls, no system OpenSSL).

use std::sync::Arc;
use std::time::Duration;

use reqwest::header::{
    HeaderMap, CONTENT_LENGTH, ETAG, IF_MATCH, IF_UNMODIFIED_SINCE, LAST_MODIFIED,
};
use reqwest::StatusCode;

use crate::device::BlockDevice;
use crate::error::{Error, ErrorKind, Result};
use crate::options::OpenOptions;

use super::range::{open_range_source, CachedSource, Fetch, FetchStats};
use super::swift::Session;

/// Attempts of one request before its failure is reported (5xx, 429, resets).
pub(crate) const ATTEMPTS: u32 = 5;

/// The HTTP client: a connect timeout, but no overall one (a segment may take minutes).
pub(crate) fn client() -> Result<reqwest::Client> {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(15))
        .read_timeout(Duration::from_secs(120))
        .build()
        .map_err(|_| Error::new(ErrorKind::Io, "cannot start the HTTP client"))
}

/// A server's answer worth asking again: overloaded, throttled, or a gateway's failure.
pub(crate) fn retryable_status(s: StatusCode) -> bool {
    s.is_server_error() || s == StatusCode::TOO_MANY_REQUESTS || s == StatusCode::REQUEST_TIMEOUT
}

/// A failure of the connection rather than of the request: worth one more try.
pub(crate) fn retryable_error(e: &reqwest::Error) -> bool {
    e.is_connect() || e.is_timeout() || e.is_request() || e.is_body() || e.is_decode()
}

/// The wait before attempt `n` (1, 2, ...): 200 ms doubling to 5 s, with jitter so
/// parallel requests do not come back in step.
pub(crate) fn backoff(n: u32) -> Duration {
    let base = 200u64 << n.min(5).saturating_sub(1);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() as u64);
    Duration::from_millis(base.min(5000) + nanos % (base / 2 + 1))
}

/// What a status means, in a few words.
pub(crate) fn status_text(s: StatusCode) -> String {
    match s.as_u16() {
        401 | 403 => "access denied".into(),
        404 => "not found".into(),
        412 => "the object changed meanwhile".into(),
        416 => "the range asked for lies outside the object".into(),
        429 => "throttled by the server (retries exhausted)".into(),
        n => format!("the server answered HTTP {n}"),
    }
}

/// What a connection failure means, in a few words (never the URL or its query).
pub(crate) fn error_text(e: &reqwest::Error) -> &'static str {
    if e.is_connect() {
        "cannot reach the server"
    } else if e.is_timeout() {
        "the server timed out"
    } else {
        "the connection to the server failed"
    }
}

/// `msg` with every secret replaced by `***`.
pub(crate) fn scrub(mut msg: String, secrets: &[String]) -> String {
    for s in secrets.iter().filter(|s| s.len() >= 4) {
        msg = msg.replace(s.as_str(), "***");
    }
    msg
}

/// Percent-encode for a URL path (`/` kept) or a query value (`/` encoded too).
pub(crate) fn encode(s: &str, query: bool) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) || (!query && b == b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A header's value as text.
pub(crate) fn header(h: &HeaderMap, name: impl reqwest::header::AsHeaderName) -> Option<String> {
    h.get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// An ETag without its quotes (Swift quotes a large object's, not a plain one's).
pub(crate) fn bare_etag(t: &str) -> &str {
    t.trim_start_matches("W/").trim_matches('"')
}

/// One object read by ranged GETs: plain HTTP(S), or a Swift object (with its session's
/// token, renewed once on a 401). Each GET carries `If-Match` with the ETag seen at open
/// (else `If-Unmodified-Since` with its Last-Modified), and the answer's own ETag is
/// compared too: a changed object is an error, never mixed content.
pub(crate) struct HttpFetch {
    pub(crate) client: reqwest::Client,
    pub(crate) url: String,
    pub(crate) name: String,
    pub(crate) len: u64,
    pub(crate) etag: Option<String>,
    pub(crate) last_modified: Option<String>,
    pub(crate) session: Option<Arc<Session>>,
    pub(crate) secrets: Vec<String>,
    /// Declared last so it is dropped last, after the client whose tasks run on it.
    pub(crate) rt: Arc<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for HttpFetch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpFetch")
            .field("name", &self.name)
            .field("len", &self.len)
            .field("etag", &self.etag)
            .finish_non_exhaustive()
    }
}

impl HttpFetch {
    async fn get(&self, start: u64, end: u64) -> std::result::Result<Vec<u8>, String> {
        let mut renewed = false;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut req = self
                .client
                .get(
                    self.session
                        .as_ref()
                        .map_or(self.url.clone(), |s| s.url(&self.url)),
                )
                .header(
                    reqwest::header::RANGE,
                    format!("bytes={}-{}", start, end - 1),
                );
            if let Some(t) = &self.etag {
                req = req.header(IF_MATCH, t);
            } else if let Some(lm) = &self.last_modified {
                req = req.header(IF_UNMODIFIED_SINCE, lm);
            }
            let token = self.session.as_ref().map(|s| s.token());
            if let Some(t) = &token {
                req = req.header("X-Auth-Token", t);
            }
            let resp = match req.send().await {
                Ok(r) => r,
                Err(e) if attempt < ATTEMPTS && retryable_error(&e) => {
                    tokio::time::sleep(backoff(attempt)).await;
                    continue;
                }
                Err(e) => return Err(format!("reading: {}", error_text(&e))),
            };
            let status = resp.status();
            if status == StatusCode::UNAUTHORIZED && !renewed {
                if let (Some(s), Some(t)) = (&self.session, &token) {
                    renewed = true;
                    s.renew(t).await.map_err(|e| e.message().to_string())?;
                    continue;
                }
            }
            if retryable_status(status) && attempt < ATTEMPTS {
                tokio::time::sleep(backoff(attempt)).await;
                continue;
            }
            let whole = start == 0 && end == self.len;
            if status == StatusCode::OK && !whole {
                return Err(
                    "reading: the server does not serve byte ranges (it ignored Range)".into(),
                );
            }
            if !(status == StatusCode::PARTIAL_CONTENT || status == StatusCode::OK) {
                return Err(format!("reading: {}", status_text(status)));
            }
            let got = header(resp.headers(), ETAG);
            if let (Some(want), Some(got)) = (&self.etag, &got) {
                if bare_etag(want) != bare_etag(got) {
                    return Err("reading: the object changed meanwhile (its ETag differs)".into());
                }
            }
            match resp.bytes().await {
                Ok(b) => return Ok(b.to_vec()),
                Err(e) if attempt < ATTEMPTS => {
                    let _ = e;
                    tokio::time::sleep(backoff(attempt)).await;
                }
                Err(e) => return Err(format!("reading: {}", error_text(&e))),
            }
        }
    }

    /// HEAD the object: its length and validators. `what` names the object in errors.
    pub(crate) async fn head(&mut self) -> Result<()> {
        let mut renewed = false;
        let mut attempt = 0;
        let fail = |why: String| Error::new(ErrorKind::Io, why).with_path(&self.name);
        let resp = loop {
            attempt += 1;
            let mut req = self.client.head(
                self.session
                    .as_ref()
                    .map_or(self.url.clone(), |s| s.url(&self.url)),
            );
            let token = self.session.as_ref().map(|s| s.token());
            if let Some(t) = &token {
                req = req.header("X-Auth-Token", t);
            }
            let resp = match req.send().await {
                Ok(r) => r,
                Err(e) if attempt < ATTEMPTS && retryable_error(&e) => {
                    tokio::time::sleep(backoff(attempt)).await;
                    continue;
                }
                Err(e) => return Err(fail(error_text(&e).into())),
            };
            let status = resp.status();
            if status == StatusCode::UNAUTHORIZED && !renewed {
                if let (Some(s), Some(t)) = (&self.session, &token) {
                    renewed = true;
                    s.renew(t).await.map_err(|e| e.with_path(&self.name))?;
                    continue;
                }
            }
            if retryable_status(status) && attempt < ATTEMPTS {
                tokio::time::sleep(backoff(attempt)).await;
                continue;
            }
            if !status.is_success() {
                return Err(fail(status_text(status)));
            }
            break resp;
        };
        let h = resp.headers();
        self.len = header(h, CONTENT_LENGTH)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| fail("the server gave no Content-Length".into()))?;
        self.etag = header(h, ETAG).filter(|t| !t.starts_with("W/"));
        self.last_modified = header(h, LAST_MODIFIED);
        Ok(())
    }
}

impl Fetch for HttpFetch {
    fn fetch(&self, start: u64, end: u64) -> std::io::Result<Vec<u8>> {
        self.rt
            .block_on(self.get(start, end))
            .map_err(|m| std::io::Error::other(scrub(m, &self.secrets)))
    }
}

/// Open `url` (`https://host/path`, or `http://` on a trusted network) as an image, read
/// by ranged GETs through a small block cache. The server must answer `Range` with 206.
pub fn open_http(url: &str, opts: &OpenOptions) -> Result<(Box<dyn BlockDevice>, Arc<FetchStats>)> {
    let rt = Arc::new(super::s3::runtime()?);
    let mut f = HttpFetch {
        client: client()?,
        url: url.to_string(),
        name: shown_url(url),
        len: 0,
        etag: None,
        last_modified: None,
        session: None,
        secrets: Vec::new(),
        rt: rt.clone(),
    };
    rt.block_on(f.head())?;
    open_fetch(f, opts)
}

pub(crate) fn open_fetch(
    f: HttpFetch,
    opts: &OpenOptions,
) -> Result<(Box<dyn BlockDevice>, Arc<FetchStats>)> {
    let stats = Arc::new(FetchStats::default());
    let (len, name) = (f.len, f.name.clone());
    let src = CachedSource::new(f, len, stats.clone());
    let dev = open_range_source(Arc::new(src), len, &name, opts)?;
    Ok((dev, stats))
}

/// The URL as shown in messages: no user:password and no query (it may hold a signature).
pub(crate) fn shown_url(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let rest = rest.split(['?', '#']).next().unwrap_or_default();
    let rest = match rest.split_once('/') {
        Some((auth, path)) => format!("{}/{path}", auth.rsplit('@').next().unwrap_or(auth)),
        None => rest.rsplit('@').next().unwrap_or(rest).to_string(),
    };
    format!("{scheme}://{rest}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shown_urls_hide_credentials_and_queries() {
        assert_eq!(
            shown_url("https://u:pw@host:8/a/b?sig=x"),
            "https://host:8/a/b"
        );
        assert_eq!(shown_url("http://h/p"), "http://h/p");
        assert_eq!(encode("a b/c", false), "a%20b/c");
        assert_eq!(encode("a/b", true), "a%2Fb");
        assert_eq!(bare_etag("\"abc\""), "abc");
        assert!(backoff(1) >= Duration::from_millis(200));
        assert!(backoff(30) <= Duration::from_millis(7600));
    }
}
