//! OpenStack Swift: convert straight into `swift://container/object`, and read such an
//! object by ranges.
//!
//! An output up to the cluster's `max_file_size` (from `GET /info`) goes up as one
//! streamed PUT whose ETag (the body's MD5) is checked; a larger one, or one longer than
//! an explicit segment size, as a Static Large Object: segments streamed in parallel (a
//! bounded number in flight, each holding a small buffer, never a whole segment) into
//! `<container>_segments` under python-swiftclient's names, each segment's ETag checked,
//! then the manifest (`?multipart-manifest=put`); or, with [`SwiftUploadOptions::dlo`], a
//! Dynamic Large Object (`X-Object-Manifest`). On any error and on [`abort_uploads`](super::abort_uploads) the
//! segments already written are deleted and no manifest is left.
//!
//! Authentication is a [`SwiftAuth`]: tempauth (`ST_AUTH`/`ST_USER`/`ST_KEY`), a token and
//! storage URL given as they are (`OS_AUTH_TOKEN`/`OS_STORAGE_URL`), or any
//! [`SwiftAuthenticate`] (a Keystone session: a token plus the object-store endpoint). A
//! token refused mid-upload (401) is renewed and the request sent again, without
//! restarting the upload.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use md5::{Digest, Md5};
use reqwest::header::{CONTENT_LENGTH, ETAG};
use reqwest::{Method, StatusCode};
use tokio::sync::mpsc;

use crate::convert::{ConvertOptions, ConvertReport};
use crate::device::BlockDevice;
use crate::error::{Error, ErrorKind, Result};
use crate::ops::convert::{prepare, run};
use crate::options::OpenOptions;
use crate::writer::Output;

use super::cancel::{Cancel, Registered};
use super::http::{
    backoff, bare_etag, client, encode, error_text, header, retryable_error, retryable_status,
    scrub, status_text, HttpFetch, ATTEMPTS,
};
use super::range::FetchStats;

/// The segment size when none is given: 1 GiB, as the seed scripts' `swift upload -S`.
pub const DEFAULT_SEGMENT_SIZE: u64 = 1 << 30;
/// Swift's default `max_file_size` (5 GiB + 2), used when the cluster hides `/info`.
pub const DEFAULT_MAX_FILE_SIZE: u64 = (5 << 30) + 2;
/// Bytes handed to a request at a time.
const CHUNK: usize = 1 << 20;
/// Chunks queued per request in flight.
const QUEUE: usize = 4;
/// The first bytes of each request kept until its answer, so that a request refused at its
/// start (401: token expired; 503) is sent again without restarting the upload.
const REPLAY: u64 = 8 << 20;
/// How long a request already sent may take to finish once the upload is cancelled: what
/// it made is then deleted.
const SETTLE: Duration = Duration::from_secs(10);

/// A location `swift://container/object`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SwiftUrl {
    /// Container name.
    pub container: String,
    /// Object name (may hold `/`).
    pub object: String,
}

impl SwiftUrl {
    /// Parse `swift://container/object`; the object must be named (not empty, not ending
    /// in `/`).
    pub fn parse(s: &str) -> Result<Self> {
        let bad = |why: &str| {
            Error::arg(format!("{why}: expected swift://CONTAINER/OBJECT")).with_path(s)
        };
        let rest = s
            .strip_prefix("swift://")
            .ok_or_else(|| bad("not a swift:// URL"))?;
        let (c, o) = rest.split_once('/').ok_or_else(|| bad("no object name"))?;
        if c.is_empty() {
            return Err(bad("no container name"));
        }
        if o.is_empty() || o.ends_with('/') {
            return Err(bad("the name must name an object"));
        }
        Ok(SwiftUrl {
            container: c.to_string(),
            object: o.to_string(),
        })
    }

    fn path(&self) -> String {
        format!(
            "{}/{}",
            encode(&self.container, true),
            encode(&self.object, false)
        )
    }
}

impl fmt::Display for SwiftUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "swift://{}/{}", self.container, self.object)
    }
}

/// A token and the storage URL it is good for: what any Swift authentication yields.
#[derive(Clone)]
pub struct SwiftToken {
    /// The account's storage URL (`http://proxy:8080/v1/AUTH_test`), the object-store
    /// endpoint of a Keystone catalog.
    pub storage_url: String,
    /// The `X-Auth-Token` value.
    pub token: String,
    /// When the token expires, if the server said.
    pub expires: Option<Instant>,
}

impl fmt::Debug for SwiftToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SwiftToken")
            .field("storage_url", &self.storage_url)
            .field("token", &"<redacted>")
            .field("expires", &self.expires)
            .finish()
    }
}

/// A source of Swift tokens that can be asked again when one is refused: the hook for
/// Keystone (a session gives a token plus the catalog's object-store endpoint).
pub trait SwiftAuthenticate: Send + Sync + fmt::Debug {
    /// A fresh token. Called from a thread of its own: it may block.
    fn authenticate(&self) -> Result<SwiftToken>;
    /// Strings never to print (passwords, application-credential secrets).
    fn secrets(&self) -> Vec<String> {
        Vec::new()
    }
}

/// How long before its expiry a Swift token is renewed, so that no request starts with a
/// token that lapses while it streams.
pub(crate) const SWIFT_RENEW_AHEAD: Duration = Duration::from_secs(60);

/// How to authenticate to Swift.
#[derive(Clone)]
#[non_exhaustive]
pub enum SwiftAuth {
    /// tempauth / swauth v1.0 (`ST_AUTH`, `ST_USER`, `ST_KEY`): `GET auth_url` with
    /// `X-Auth-User`/`X-Auth-Key` gives the storage URL and a token; asked again on a 401.
    TempAuth {
        /// `http://proxy:8080/auth/v1.0`
        auth_url: String,
        /// `account:user`
        user: String,
        /// The key.
        key: String,
    },
    /// A token and storage URL obtained elsewhere (`OS_AUTH_TOKEN`, `OS_STORAGE_URL`):
    /// used as they are, so a refused token is an error.
    Token {
        /// The storage URL.
        storage_url: String,
        /// The token.
        token: String,
    },
    /// Any other source of tokens (Keystone v3).
    Other(Arc<dyn SwiftAuthenticate>),
}

impl fmt::Debug for SwiftAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SwiftAuth::TempAuth { auth_url, user, .. } => f
                .debug_struct("TempAuth")
                .field("auth_url", auth_url)
                .field("user", user)
                .field("key", &"<redacted>")
                .finish(),
            SwiftAuth::Token { storage_url, .. } => f
                .debug_struct("Token")
                .field("storage_url", storage_url)
                .field("token", &"<redacted>")
                .finish(),
            SwiftAuth::Other(a) => f.debug_tuple("Other").field(a).finish(),
        }
    }
}

impl SwiftAuth {
    /// From the environment, in python-swiftclient's order: `OS_STORAGE_URL` with
    /// `OS_AUTH_TOKEN` (used as given); else `ST_AUTH`, `ST_USER`, `ST_KEY` (tempauth);
    /// else Keystone v3 when `OS_AUTH_URL` or `OS_CLOUD` is set (password or application
    /// credential, [`AuthConfig::from_env`](super::AuthConfig::from_env)), the storage URL
    /// being the catalog's `object-store` endpoint unless `OS_STORAGE_URL` names one.
    /// `storage_url` (the CLI's `--os-storage-url`) overrides `OS_STORAGE_URL`.
    pub fn from_env(storage_url: Option<&str>) -> Result<Self> {
        let var = |n: &str| std::env::var(n).ok().filter(|v| !v.is_empty());
        let storage = storage_url
            .map(str::to_string)
            .or_else(|| var("OS_STORAGE_URL"));
        if let (Some(storage_url), Some(token)) = (storage.clone(), var("OS_AUTH_TOKEN")) {
            return Ok(SwiftAuth::Token { storage_url, token });
        }
        match (var("ST_AUTH"), var("ST_USER"), var("ST_KEY")) {
            (Some(auth_url), Some(user), Some(key)) => Ok(SwiftAuth::TempAuth {
                auth_url,
                user,
                key,
            }),
            _ if var("OS_AUTH_URL").is_some() || var("OS_CLOUD").is_some() => {
                let mut cfg = super::AuthConfig::from_env()?;
                if let Some(u) = storage {
                    cfg.set_endpoint("object-store", &u);
                }
                let session = Arc::new(super::Session::new(cfg)?);
                Ok(SwiftAuth::Other(Arc::new(
                    super::swift_keystone::KeystoneSwift::new(session),
                )))
            }
            _ => Err(Error::arg(
                "Swift: no credentials; set ST_AUTH, ST_USER and ST_KEY (tempauth), OS_AUTH_URL \
                 (or OS_CLOUD) with a password or application credential (Keystone v3), or \
                 OS_STORAGE_URL (or --os-storage-url) and OS_AUTH_TOKEN",
            )),
        }
    }

    fn secrets(&self) -> Vec<String> {
        match self {
            SwiftAuth::TempAuth { key, .. } => vec![key.clone()],
            SwiftAuth::Token { token, .. } => vec![token.clone()],
            SwiftAuth::Other(a) => a.secrets(),
        }
    }
}

/// A logged-in Swift account: the current token, renewed when refused.
pub(crate) struct Session {
    auth: SwiftAuth,
    client: reqwest::Client,
    current: Mutex<SwiftToken>,
    renewing: tokio::sync::Mutex<()>,
    secrets: Mutex<Vec<String>>,
    /// Tokens obtained (1 + renewals), for the report.
    logins: std::sync::atomic::AtomicU64,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("auth", &self.auth)
            .finish_non_exhaustive()
    }
}

async fn tempauth(
    client: &reqwest::Client,
    auth_url: &str,
    user: &str,
    key: &str,
) -> Result<SwiftToken> {
    let fail = |why: String| Error::new(ErrorKind::Io, format!("authenticating: {why}"));
    let mut attempt = 0;
    let resp = loop {
        attempt += 1;
        let r = client
            .get(auth_url)
            .header("X-Auth-User", user)
            .header("X-Auth-Key", key)
            .send()
            .await;
        match r {
            Ok(r) if retryable_status(r.status()) && attempt < ATTEMPTS => {}
            Ok(r) => break r,
            Err(e) if retryable_error(&e) && attempt < ATTEMPTS => {}
            Err(e) => return Err(fail(error_text(&e).into())),
        }
        tokio::time::sleep(backoff(attempt)).await;
    };
    if !resp.status().is_success() {
        return Err(fail(status_text(resp.status())));
    }
    let h = resp.headers();
    let storage_url =
        header(h, "X-Storage-Url").ok_or_else(|| fail("no X-Storage-Url in the answer".into()))?;
    let token = header(h, "X-Auth-Token")
        .or_else(|| header(h, "X-Storage-Token"))
        .ok_or_else(|| fail("no X-Auth-Token in the answer".into()))?;
    let expires = header(h, "X-Auth-Token-Expires")
        .and_then(|s| s.parse::<f64>().ok())
        .map(|s| Instant::now() + Duration::from_secs_f64(s.max(0.0)));
    Ok(SwiftToken {
        storage_url: storage_url.trim_end_matches('/').to_string(),
        token,
        expires,
    })
}

impl Session {
    async fn login(auth: SwiftAuth, client: reqwest::Client) -> Result<Arc<Self>> {
        let mut secrets = auth.secrets();
        let t = Self::authenticate(&auth, &client).await?;
        secrets.push(t.token.clone());
        Ok(Arc::new(Session {
            auth,
            client,
            current: Mutex::new(t),
            renewing: tokio::sync::Mutex::new(()),
            secrets: Mutex::new(secrets),
            logins: 1.into(),
        }))
    }

    async fn authenticate(auth: &SwiftAuth, client: &reqwest::Client) -> Result<SwiftToken> {
        match auth {
            SwiftAuth::TempAuth {
                auth_url,
                user,
                key,
            } => tempauth(client, auth_url, user, key).await,
            SwiftAuth::Token { storage_url, token } => Ok(SwiftToken {
                storage_url: storage_url.trim_end_matches('/').to_string(),
                token: token.clone(),
                expires: None,
            }),
            SwiftAuth::Other(a) => {
                // Its own thread: a Keystone client may block or run a runtime of its own.
                let a = a.clone();
                let (tx, rx) = tokio::sync::oneshot::channel();
                std::thread::spawn(move || {
                    let _ = tx.send(a.authenticate());
                });
                rx.await.unwrap_or_else(|_| {
                    Err(Error::new(
                        ErrorKind::Io,
                        "authenticating: the authenticator failed",
                    ))
                })
            }
        }
    }

    pub(crate) fn token(&self) -> String {
        self.current
            .lock()
            .map(|t| t.token.clone())
            .unwrap_or_default()
    }

    /// The storage URL joined with `path` (already encoded).
    pub(crate) fn url(&self, path: &str) -> String {
        let base = self
            .current
            .lock()
            .map(|t| t.storage_url.clone())
            .unwrap_or_default();
        if path.is_empty() {
            base
        } else {
            format!("{base}/{path}")
        }
    }

    pub(crate) fn secrets(&self) -> Vec<String> {
        self.secrets.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Replace the token `stale` that the server refused (once, however many requests saw
    /// it refused). A token given as is cannot be renewed: access denied.
    pub(crate) async fn renew(&self, stale: &str) -> Result<()> {
        let _one = self.renewing.lock().await;
        if self.token() != stale {
            return Ok(());
        }
        if matches!(self.auth, SwiftAuth::Token { .. }) {
            return Err(Error::new(
                ErrorKind::Io,
                "access denied (the token was refused)",
            ));
        }
        let t = Self::authenticate(&self.auth, &self.client).await?;
        if let Ok(mut s) = self.secrets.lock() {
            s.push(t.token.clone());
        }
        if let Ok(mut c) = self.current.lock() {
            *c = t;
        }
        self.logins.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Renew ahead of time a token about to expire (tempauth and Keystone say when).
    async fn fresh(&self) -> Result<()> {
        let (token, soon) = match self.current.lock() {
            Ok(t) => (
                t.token.clone(),
                t.expires.is_some_and(|e| {
                    e.saturating_duration_since(Instant::now()) < SWIFT_RENEW_AHEAD
                }),
            ),
            Err(_) => return Ok(()),
        };
        if soon && !matches!(self.auth, SwiftAuth::Token { .. }) {
            self.renew(&token).await?;
        }
        Ok(())
    }

    /// One request with a small body (or none), retried on 5xx/429/resets and sent again
    /// once with a renewed token after a 401. Returns the answer, whatever its status.
    async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(String, String)],
        body: Option<Bytes>,
    ) -> std::result::Result<reqwest::Response, String> {
        let mut renewed = false;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let token = self.token();
            let mut req = self
                .client
                .request(method.clone(), self.url(path))
                .header("X-Auth-Token", &token);
            for (k, v) in headers {
                req = req.header(k.as_str(), v.as_str());
            }
            if let Some(b) = &body {
                req = req.header(CONTENT_LENGTH, b.len()).body(b.clone());
            } else if method == Method::PUT {
                req = req.header(CONTENT_LENGTH, 0);
            }
            match req.send().await {
                Ok(r) if r.status() == StatusCode::UNAUTHORIZED && !renewed => {
                    renewed = true;
                    self.renew(&token)
                        .await
                        .map_err(|e| e.message().to_string())?;
                }
                Ok(r) if retryable_status(r.status()) && attempt < ATTEMPTS => {
                    tokio::time::sleep(backoff(attempt)).await;
                }
                Ok(r) => return Ok(r),
                Err(e) if retryable_error(&e) && attempt < ATTEMPTS => {
                    tokio::time::sleep(backoff(attempt)).await;
                }
                Err(e) => return Err(error_text(&e).to_string()),
            }
        }
    }
}

/// What the cluster allows (`GET /info`).
#[derive(Debug, Clone)]
struct Limits {
    max_file_size: u64,
    slo: bool,
    max_manifest_segments: u64,
    min_segment_size: u64,
}

async fn limits(s: &Session) -> Limits {
    let mut l = Limits {
        max_file_size: DEFAULT_MAX_FILE_SIZE,
        slo: true,
        max_manifest_segments: 1000,
        min_segment_size: 1,
    };
    // /info lives at the root of the storage URL's host, unauthenticated.
    let base = s.url("");
    let root = match base.split_once("://") {
        Some((scheme, rest)) => format!(
            "{scheme}://{}/info",
            rest.split('/').next().unwrap_or_default()
        ),
        None => return l,
    };
    let Ok(resp) = s.client.get(&root).send().await else {
        return l;
    };
    if !resp.status().is_success() {
        return l;
    }
    let Ok(v) = resp
        .bytes()
        .await
        .map_err(|_| ())
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).map_err(|_| ()))
    else {
        return l;
    };
    if let Some(m) = v["swift"]["max_file_size"].as_u64() {
        l.max_file_size = m;
    }
    l.slo = v.get("slo").is_some();
    if let Some(m) = v["slo"]["max_manifest_segments"].as_u64() {
        l.max_manifest_segments = m;
    }
    if let Some(m) = v["slo"]["min_segment_size"].as_u64() {
        l.min_segment_size = m;
    }
    l
}

/// How to upload to Swift.
#[derive(Debug, Clone)]
pub struct SwiftUploadOptions {
    /// Segment size of a large object; None: [`DEFAULT_SEGMENT_SIZE`], and only outputs
    /// over the cluster's `max_file_size` are segmented. Given, any output longer than it
    /// is segmented.
    pub segment_size: Option<u64>,
    /// A Dynamic Large Object (`X-Object-Manifest`) instead of a Static one, for clusters
    /// without SLO.
    pub dlo: bool,
    /// Requests streaming at once (segments in flight); at least 1.
    pub in_flight: usize,
    /// User metadata (`X-Object-Meta-KEY: VALUE`).
    pub metadata: Vec<(String, String)>,
    /// Put the digests of [`ConvertOptions::digests`] into the metadata
    /// (`X-Object-Meta-Sha256`).
    pub digest_metadata: bool,
}

impl Default for SwiftUploadOptions {
    fn default() -> Self {
        SwiftUploadOptions {
            segment_size: None,
            dlo: false,
            in_flight: 4,
            metadata: Vec::new(),
            digest_metadata: true,
        }
    }
}

/// What a Swift upload produced.
#[derive(Debug, Clone)]
pub struct SwiftUploadReport {
    /// The conversion's report (virtual size, bytes written, digests, notes).
    pub convert: ConvertReport,
    /// The object written, `swift://container/object`.
    pub url: String,
    /// The object's ETag (a large object's: the MD5 of its segments' ETags), unquoted.
    pub etag: Option<String>,
    /// `single`, `slo` or `dlo`.
    pub layout: &'static str,
    /// Segments written (0 for a single PUT).
    pub segments: u64,
    /// Segment size used (0 for a single PUT).
    pub segment_size: u64,
    /// The container holding the segments.
    pub segment_container: Option<String>,
    /// Tokens obtained: 1, plus one per renewal after a refused (expired) token.
    pub logins: u64,
    /// The user metadata stored with the object.
    pub metadata: Vec<(String, String)>,
}

impl SwiftUploadReport {
    /// The report as the CLI's `--output=json` prints it (fields beside the conversion's).
    pub fn json_fields(&self) -> serde_json::Value {
        let meta: serde_json::Map<String, serde_json::Value> = self
            .metadata
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::from(v.as_str())))
            .collect();
        serde_json::json!({
            "url": self.url,
            "etag": self.etag,
            "layout": self.layout,
            "segments": self.segments,
            "segment-size": self.segment_size,
            "segment-container": self.segment_container,
            "logins": self.logins,
            "metadata": meta,
        })
    }
}

/// A streamed request body: chunks from the producer, the first [`REPLAY`] bytes kept so
/// the request can be sent again from its start.
struct BodyFeed {
    rx: tokio::sync::Mutex<mpsc::Receiver<Bytes>>,
    kept: Mutex<Option<Vec<Bytes>>>,
}

impl BodyFeed {
    fn body(self: &Arc<Self>) -> Option<reqwest::Body> {
        let replay: Vec<Bytes> = self.kept.lock().ok()?.clone()?;
        let kept_len: u64 = replay.iter().map(|b| b.len() as u64).sum();
        let st = (self.clone(), replay.into_iter(), kept_len);
        let s = futures_util::stream::unfold(st, |(feed, mut replay, mut kept_len)| async move {
            if let Some(b) = replay.next() {
                return Some((Ok::<Bytes, std::io::Error>(b), (feed, replay, kept_len)));
            }
            let b = feed.rx.lock().await.recv().await?;
            kept_len += b.len() as u64;
            if let Ok(mut k) = feed.kept.lock() {
                if kept_len > REPLAY {
                    *k = None;
                } else if let Some(v) = k.as_mut() {
                    v.push(b.clone());
                }
            }
            Some((Ok(b), (feed, replay, kept_len)))
        });
        Some(reqwest::Body::wrap_stream(s))
    }
}

/// PUT `path` with the body streamed from `rx` (`len` bytes, or chunked when unknown);
/// returns the server's ETag. Sent again (from the kept start) after a 401 with a renewed
/// token, or a 5xx/reset, while the bytes sent so far are still kept.
async fn put_streamed(
    s: Arc<Session>,
    path: String,
    rx: mpsc::Receiver<Bytes>,
    len: Option<u64>,
    headers: Vec<(String, String)>,
) -> std::result::Result<String, String> {
    let feed = Arc::new(BodyFeed {
        rx: tokio::sync::Mutex::new(rx),
        kept: Mutex::new(Some(Vec::new())),
    });
    // Check the token first with a HEAD of the container (renewed there on a 401): a
    // token that expired between two segments then never costs a segment's bytes, which
    // a server may read on before refusing them.
    let container = path.split('/').next().unwrap_or_default();
    match s.send(Method::HEAD, container, &[], None).await {
        Ok(r) if r.status().is_success() => {}
        Ok(r) => return Err(status_text(r.status())),
        Err(why) => return Err(why),
    }
    let mut attempt = 0;
    let mut renewals = 0;
    let mut last = String::new();
    loop {
        attempt += 1;
        let token = s.token();
        let Some(body) = feed.body() else {
            return Err(format!(
                "{last} after more than its first {} MiB were sent; it cannot be resent",
                REPLAY >> 20
            ));
        };
        let mut req = s.client.put(s.url(&path)).header("X-Auth-Token", &token);
        if let Some(n) = len {
            req = req.header(CONTENT_LENGTH, n);
        }
        for (k, v) in &headers {
            req = req.header(k.as_str(), v.as_str());
        }
        let r = req.body(body).send().await;
        let again = match r {
            Ok(resp) if resp.status().is_success() => {
                return header(resp.headers(), ETAG)
                    .map(|t| bare_etag(&t).to_string())
                    .ok_or_else(|| "the server gave no ETag".to_string());
            }
            Ok(resp) if resp.status() == StatusCode::UNAUTHORIZED && renewals < 2 => {
                renewals += 1;
                last = "the token was refused".into();
                s.renew(&token).await.map_err(|e| e.message().to_string())?;
                true
            }
            Ok(resp) if retryable_status(resp.status()) && attempt < ATTEMPTS => {
                last = status_text(resp.status());
                false
            }
            Ok(resp) => return Err(status_text(resp.status())),
            Err(e) if retryable_error(&e) && attempt < ATTEMPTS => {
                last = format!("{} ({e:?})", error_text(&e));
                false
            }
            Err(e) => return Err(error_text(&e).to_string()),
        };
        if !again {
            tokio::time::sleep(backoff(attempt)).await;
        }
    }
}

/// Single object, static or dynamic large object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    Single,
    Slo,
    Dlo,
}

/// A request being fed by the engine.
struct Feeding {
    name: String,
    tx: mpsc::Sender<Bytes>,
    chunk: Vec<u8>,
    md5: Md5,
    len: u64,
    task: tokio::task::JoinHandle<std::result::Result<String, String>>,
}

/// A request fully fed, waiting for its answer.
struct Sent {
    name: String,
    len: u64,
    md5: String,
    task: tokio::task::JoinHandle<std::result::Result<String, String>>,
}

/// A segment stored, its ETag checked.
struct Stored {
    name: String,
    len: u64,
    etag: String,
}

struct Upload {
    rt: Arc<tokio::runtime::Runtime>,
    session: Arc<Session>,
    cancel: Arc<Cancel>,
    url: SwiftUrl,
    shown: String,
    layout: Layout,
    /// Known once the output's length is (the image writer is made).
    ready: bool,
    total: Option<u64>,
    segment_size: u64,
    seg_container: String,
    /// Segment names: this prefix and an 8-digit index.
    seg_prefix: String,
    in_flight: usize,
    headers: Vec<(String, String)>,
    pending: Vec<u8>,
    feeding: Option<Feeding>,
    sent: VecDeque<Sent>,
    stored: Vec<Stored>,
    /// Every segment name a request was started for (deleted on failure).
    started: Vec<String>,
    /// The single PUT (or the manifest) landed: on failure, delete the object.
    object_written: bool,
    error: Option<Error>,
}

fn interrupted(url: &str) -> Error {
    Error::new(
        ErrorKind::Io,
        "upload interrupted; what was written is deleted",
    )
    .with_path(url)
}

impl Upload {
    fn fail(&self, what: &str, why: &str) -> Error {
        Error::new(
            ErrorKind::Io,
            scrub(format!("{what}: {why}"), &self.session.secrets()),
        )
        .with_path(&self.shown)
    }

    fn push(&mut self, mut data: &[u8]) -> Result<()> {
        if self.cancel.is_set() {
            return Err(interrupted(&self.shown));
        }
        if !self.ready {
            self.pending.extend_from_slice(data);
            return Ok(());
        }
        while !data.is_empty() {
            if self.cancel.is_set() {
                return Err(interrupted(&self.shown));
            }
            if self.feeding.is_none() {
                self.start_request()?;
            }
            let f = self.feeding.as_mut().expect("started");
            let room = if self.layout == Layout::Single {
                u64::MAX
            } else {
                self.segment_size - f.len
            };
            let n = (room.min(data.len() as u64)) as usize;
            f.md5.update(&data[..n]);
            f.chunk.extend_from_slice(&data[..n]);
            f.len += n as u64;
            data = &data[n..];
            if f.chunk.len() >= CHUNK {
                self.send_chunk()?;
            }
            if self.layout != Layout::Single
                && self
                    .feeding
                    .as_ref()
                    .is_some_and(|f| f.len == self.segment_size)
            {
                self.close_request()?;
            }
        }
        Ok(())
    }

    /// Hand the gathered bytes to the request, waiting while its queue is full.
    fn send_chunk(&mut self) -> Result<()> {
        let f = self.feeding.as_mut().expect("started");
        if f.chunk.is_empty() {
            return Ok(());
        }
        let data = Bytes::from(std::mem::replace(&mut f.chunk, Vec::with_capacity(CHUNK)));
        let tx = f.tx.clone();
        let cancel = self.cancel.clone();
        let r = self.rt.block_on(async {
            tokio::select! {
                r = tx.send(data) => Some(r.is_ok()),
                _ = cancel.wait() => None,
            }
        });
        match r {
            None => Err(interrupted(&self.shown)),
            Some(true) => Ok(()),
            Some(false) => {
                // The request ended early: its error says why.
                let f = self.feeding.take().expect("started");
                let why = match self.rt.block_on(f.task) {
                    Ok(Err(why)) => why,
                    _ => "the request ended early".into(),
                };
                Err(self.fail(&format!("uploading {}", self.what(&f.name)), &why))
            }
        }
    }

    fn what(&self, name: &str) -> String {
        if self.layout == Layout::Single {
            "the object".into()
        } else {
            format!("segment {name}")
        }
    }

    /// Start the next request (the object, or the next segment), once a slot is free.
    fn start_request(&mut self) -> Result<()> {
        while self.sent.len() + 1 > self.in_flight {
            self.collect_one()?;
        }
        self.rt
            .block_on(self.session.fresh())
            .map_err(|e| e.with_path(&self.shown))?;
        let (path, len, name, headers) = match self.layout {
            Layout::Single => (
                self.url.path(),
                self.total,
                self.url.object.clone(),
                self.headers.clone(),
            ),
            _ => {
                let idx = self.stored.len() + self.sent.len();
                let name = format!("{}{idx:08}", self.seg_prefix);
                let len = self
                    .total
                    .map(|t| (t - idx as u64 * self.segment_size).min(self.segment_size));
                let path = format!(
                    "{}/{}",
                    encode(&self.seg_container, true),
                    encode(&name, false)
                );
                self.started.push(name.clone());
                (path, len, name, Vec::new())
            }
        };
        let (tx, rx) = mpsc::channel(QUEUE);
        let task = self
            .rt
            .spawn(put_streamed(self.session.clone(), path, rx, len, headers));
        self.feeding = Some(Feeding {
            name,
            tx,
            chunk: Vec::with_capacity(CHUNK),
            md5: Md5::new(),
            len: 0,
            task,
        });
        Ok(())
    }

    /// All of the request's bytes are handed over: it finishes on its own.
    fn close_request(&mut self) -> Result<()> {
        self.send_chunk()?;
        let f = self.feeding.take().expect("started");
        drop(f.tx);
        self.sent.push_back(Sent {
            name: f.name,
            len: f.len,
            md5: hex(&f.md5.finalize()),
            task: f.task,
        });
        Ok(())
    }

    /// Wait for the oldest request's answer and check its ETag.
    fn collect_one(&mut self) -> Result<()> {
        let Some(mut s) = self.sent.pop_front() else {
            return Ok(());
        };
        let cancel = self.cancel.clone();
        let r = self.rt.block_on(async {
            tokio::select! {
                r = &mut s.task => Some(r),
                _ = cancel.wait() => None,
            }
        });
        let r = match r {
            Some(r) => r,
            None => {
                // Cancelled: let a request already sent finish, so its object is known.
                self.sent.push_front(s);
                return Err(interrupted(&self.shown));
            }
        };
        let what = self.what(&s.name);
        let etag = match r {
            Ok(Ok(t)) => t,
            Ok(Err(why)) => return Err(self.fail(&format!("uploading {what}"), &why)),
            Err(_) => {
                return Err(self.fail(&format!("uploading {what}"), "the request was stopped"))
            }
        };
        if self.layout == Layout::Single {
            self.object_written = true;
        }
        if !etag.eq_ignore_ascii_case(&s.md5) {
            return Err(self.fail(
                &format!("uploading {what}"),
                &format!(
                    "the server's ETag {etag} does not match the MD5 of the bytes sent ({})",
                    s.md5
                ),
            ));
        }
        self.stored.push(Stored {
            name: s.name,
            len: s.len,
            etag,
        });
        Ok(())
    }

    /// The whole output is written: finish the requests, then the manifest.
    fn finish(&mut self, report: &ConvertReport, digest_metadata: bool) -> Result<Option<String>> {
        if self.cancel.is_set() {
            return Err(interrupted(&self.shown));
        }
        if !self.ready {
            return Err(self.fail("uploading", "the output's length was never known"));
        }
        if self.feeding.is_none() && self.layout == Layout::Single {
            // An empty object still needs its PUT.
            self.start_request()?;
        }
        if self.feeding.is_some() {
            self.close_request()?;
        }
        while !self.sent.is_empty() {
            self.collect_one()?;
        }
        let mut meta = self.headers.clone();
        if digest_metadata {
            for (a, h) in &report.digests {
                meta.push((format!("X-Object-Meta-{}", a.name()), h.clone()));
            }
        }
        let session = self.session.clone();
        let path = self.url.path();
        let etag = match self.layout {
            Layout::Single => {
                let etag = self.stored.first().map(|s| s.etag.clone());
                if meta.len() > self.headers.len() {
                    // The digests are known only now: POST sets the metadata again, with them.
                    let r = self
                        .rt
                        .block_on(session.send(Method::POST, &path, &meta, None));
                    self.check(r, "storing the digests in the metadata")?;
                }
                etag
            }
            Layout::Slo => {
                let manifest: Vec<serde_json::Value> = self
                    .stored
                    .iter()
                    .map(|s| {
                        serde_json::json!({
                            "path": format!("/{}/{}", self.seg_container, s.name),
                            "etag": s.etag,
                            "size_bytes": s.len,
                        })
                    })
                    .collect();
                let body = Bytes::from(serde_json::to_vec(&manifest).expect("json"));
                let r = self.rt.block_on(session.send(
                    Method::PUT,
                    &format!("{path}?multipart-manifest=put"),
                    &meta,
                    Some(body),
                ));
                let resp = self.check(r, "storing the SLO manifest")?;
                self.object_written = true;
                header(resp.headers(), ETAG).map(|t| bare_etag(&t).to_string())
            }
            Layout::Dlo => {
                meta.push((
                    "X-Object-Manifest".into(),
                    format!(
                        "{}/{}",
                        encode(&self.seg_container, true),
                        encode(&self.seg_prefix, false)
                    ),
                ));
                let r =
                    self.rt
                        .block_on(session.send(Method::PUT, &path, &meta, Some(Bytes::new())));
                self.check(r, "storing the DLO manifest")?;
                self.object_written = true;
                None
            }
        };
        if self.cancel.is_set() {
            return Err(interrupted(&self.shown));
        }
        if self.layout == Layout::Single {
            return Ok(etag);
        }
        // A large object's ETag is the MD5 of its segments' ETags: check what the server
        // serves against the segments sent.
        let mut all = Md5::new();
        for s in &self.stored {
            all.update(s.etag.as_bytes());
        }
        let want = hex(&all.finalize());
        let r = self
            .rt
            .block_on(session.send(Method::HEAD, &path, &[], None));
        let resp = self.check(r, "checking the large object")?;
        let got = header(resp.headers(), ETAG).map(|t| bare_etag(&t).to_string());
        let len = header(resp.headers(), CONTENT_LENGTH).and_then(|v| v.parse::<u64>().ok());
        let sent: u64 = self.stored.iter().map(|s| s.len).sum();
        if got.as_deref() != Some(want.as_str()) || len != Some(sent) {
            return Err(self.fail(
                "checking the large object",
                &format!(
                    "the server serves ETag {} and {} bytes, not the segments' {want} and {sent} bytes",
                    got.as_deref().unwrap_or("(none)"),
                    len.map_or("(unknown)".into(), |l| l.to_string())
                ),
            ));
        }
        Ok(got.or(etag))
    }

    fn check(
        &self,
        r: std::result::Result<reqwest::Response, String>,
        what: &str,
    ) -> Result<reqwest::Response> {
        match r {
            Ok(resp) if resp.status().is_success() => Ok(resp),
            Ok(resp) => Err(self.fail(what, &status_text(resp.status()))),
            Err(why) => Err(self.fail(what, &why)),
        }
    }

    /// After a failure or a cancel: stop the requests (one already fed may finish, for
    /// [`SETTLE`]), then delete every segment started and the object if we wrote it.
    fn abort(&mut self) {
        let mut tasks: Vec<_> = self.sent.drain(..).map(|s| s.task).collect();
        if let Some(f) = self.feeding.take() {
            // Unfinished: dropping its feed and stopping it makes the server discard it.
            f.task.abort();
            tasks.push(f.task);
        }
        let single = self.layout == Layout::Single;
        let landed = self.rt.block_on(async {
            let mut landed = false;
            for t in tasks {
                if let Ok(Ok(Ok(_))) = tokio::time::timeout(SETTLE, t).await {
                    landed = true;
                }
            }
            landed
        });
        if single && landed {
            self.object_written = true;
        }
        let session = self.session.clone();
        let mut left = Vec::new();
        if self.object_written {
            let q = if self.layout == Layout::Slo {
                "?multipart-manifest=delete"
            } else {
                ""
            };
            let path = format!("{}{q}", self.url.path());
            match self
                .rt
                .block_on(session.send(Method::DELETE, &path, &[], None))
            {
                Ok(r) if r.status().is_success() || r.status() == StatusCode::NOT_FOUND => {}
                _ => left.push(self.url.object.clone()),
            }
        }
        let names = std::mem::take(&mut self.started);
        let segs = self.seg_container.clone();
        let failed: Vec<String> = self.rt.block_on(async {
            let mut failed = Vec::new();
            for n in names {
                let p = format!("{}/{}", encode(&segs, true), encode(&n, false));
                match session.send(Method::DELETE, &p, &[], None).await {
                    Ok(r) if r.status().is_success() || r.status() == StatusCode::NOT_FOUND => {}
                    _ => failed.push(n),
                }
            }
            failed
        });
        if !failed.is_empty() || !left.is_empty() {
            eprintln!(
                "diskconv: warning: {}: could not delete {} of what was written; remove it with \
                 `diskconv abort-uploads swift://{}/{}`",
                self.shown,
                failed.len() + left.len(),
                self.url.container,
                self.url.object
            );
        }
    }
}

/// The engine's [`Write`] into the upload.
struct Sink(Arc<Mutex<Upload>>);

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut up = self
            .0
            .lock()
            .map_err(|_| std::io::Error::other("upload state poisoned"))?;
        match up.push(buf) {
            Ok(()) => Ok(buf.len()),
            Err(e) => {
                let msg = e.to_string();
                up.error.get_or_insert(e);
                Err(std::io::Error::other(msg))
            }
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Seconds since the epoch with six decimals, as swiftclient names segments (it uses the
/// file's mtime; a converted image has none, so the upload's start).
fn timestamp() -> String {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    format!("{}.{:06}", d.as_secs(), d.subsec_micros())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn check_metadata(meta: &[(String, String)]) -> Result<()> {
    for (k, v) in meta {
        let ok_key = !k.is_empty()
            && k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !ok_key {
            return Err(Error::arg(format!(
                "metadata key '{k}': use letters, digits, '-' and '_'"
            ))
            .with_field("metadata"));
        }
        if v.bytes().any(|b| !(b' '..=b'~').contains(&b)) {
            return Err(Error::arg(format!(
                "metadata '{k}': the value must be printable ASCII (an HTTP header)"
            ))
            .with_field("metadata"));
        }
    }
    Ok(())
}

/// Convert `src` straight into the Swift object `dest`, as `opts` says (any output format
/// that streams), in one pass with no temporary file; memory is bounded by
/// [`SwiftUploadOptions::in_flight`] requests' small buffers whatever the image size.
///
/// A single PUT when the output fits the cluster's `max_file_size` (and no smaller
/// segment size is asked for), else a Static (or, with `dlo`, Dynamic) Large Object. The
/// container must exist; `<container>_segments` is created when missing. On any failure,
/// and when [`abort_uploads`](super::abort_uploads) is called meanwhile, the segments written are deleted and no
/// manifest is left.
pub fn convert_to_swift(
    src: &dyn BlockDevice,
    dest: &SwiftUrl,
    auth: &SwiftAuth,
    up: &SwiftUploadOptions,
    opts: &ConvertOptions,
) -> Result<SwiftUploadReport> {
    let shown = dest.to_string();
    if opts.existing_target {
        return Err(Error::arg("-n cannot be used with a swift:// output").with_path(&shown));
    }
    check_metadata(&up.metadata).map_err(|e| e.with_path(&shown))?;
    let registered = Registered::new();
    let rt = Arc::new(super::s3::runtime()?);
    let session = rt
        .block_on(Session::login(auth.clone(), client()?))
        .map_err(|e| e.with_path(&shown))?;
    let secrets = session.secrets();
    let fail = |what: &str, why: String| {
        Error::new(ErrorKind::Io, scrub(format!("{what}: {why}"), &secrets)).with_path(&shown)
    };

    // The container must exist: a typo must not create one.
    let cpath = encode(&dest.container, true);
    match rt.block_on(session.send(Method::HEAD, &cpath, &[], None)) {
        Ok(r) if r.status().is_success() => {}
        Ok(r) if r.status() == StatusCode::NOT_FOUND => {
            return Err(fail("uploading", "no such container".into()))
        }
        Ok(r) => return Err(fail("opening the container", status_text(r.status()))),
        Err(why) => return Err(fail("opening the container", why)),
    }
    let limits = rt.block_on(limits(&session));

    let mut headers = object_headers(&up.metadata, src.info().format, opts.format.name());
    let mtime = timestamp();
    headers.push(("X-Object-Meta-Mtime".into(), mtime.clone()));
    let seg_container = format!("{}_segments", dest.container);

    let state = Arc::new(Mutex::new(Upload {
        rt: rt.clone(),
        session: session.clone(),
        cancel: registered.0.clone(),
        url: dest.clone(),
        shown: shown.clone(),
        layout: Layout::Single,
        ready: false,
        total: None,
        segment_size: 0,
        seg_container: seg_container.clone(),
        seg_prefix: String::new(),
        in_flight: up.in_flight.max(1),
        headers: headers.clone(),
        pending: Vec::new(),
        feeding: None,
        sent: VecDeque::new(),
        stored: Vec::new(),
        started: Vec::new(),
        object_written: false,
        error: None,
    }));
    let (out, sink) = Output::from_writer(Path::new(&shown), Box::new(Sink(state.clone())));
    let (out, writer) = prepare(src, out, sink, opts)?;

    // The exact length is known before the first byte except for compressed outputs,
    // which stay under the guest size plus their tables.
    let len = writer.output_len();
    let bound = len.unwrap_or_else(|| {
        let v = writer.virtual_size();
        v.saturating_add(v / 16).saturating_add(64 << 20)
    });
    let seg = up.segment_size.unwrap_or(DEFAULT_SEGMENT_SIZE);
    let large = if up.segment_size.is_some() {
        bound > seg
    } else {
        bound > limits.max_file_size
    };
    let layout = match (large, up.dlo) {
        (false, _) => Layout::Single,
        (true, true) => Layout::Dlo,
        (true, false) => Layout::Slo,
    };
    if layout != Layout::Single {
        check_segment_size(layout, seg, bound, len, &limits).map_err(|e| e.with_path(&shown))?;
        // python-swiftclient's names, so its tools (and ours) recognise the segments.
        let slo = if layout == Layout::Slo { "slo/" } else { "" };
        let prefix = match len {
            Some(l) => format!("{}/{slo}{mtime}/{l}/{seg}/", dest.object),
            None => format!("{}/{slo}{mtime}/{seg}/", dest.object),
        };
        match rt.block_on(session.send(Method::PUT, &encode(&seg_container, true), &[], None)) {
            Ok(r) if r.status().is_success() => {}
            Ok(r) => {
                return Err(fail(
                    &format!("creating the container {seg_container}"),
                    status_text(r.status()),
                ))
            }
            Err(why) => {
                return Err(fail(
                    &format!("creating the container {seg_container}"),
                    why,
                ))
            }
        }
        let mut st = state.lock().expect("fresh");
        st.seg_prefix = prefix;
    }
    {
        let mut st = state.lock().expect("fresh");
        st.layout = layout;
        st.total = len;
        st.segment_size = if layout == Layout::Single { 0 } else { seg };
        st.ready = true;
        let pending = std::mem::take(&mut st.pending);
        if let Err(e) = st.push(&pending) {
            st.abort();
            return Err(e);
        }
    }

    let converted = run(src, out, writer, opts);
    let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
    let result = converted
        .map_err(|e| st.error.take().unwrap_or(e))
        .and_then(|report| {
            let etag = st.finish(&report, up.digest_metadata)?;
            let mut metadata: Vec<(String, String)> = st
                .headers
                .iter()
                .filter_map(|(k, v)| {
                    k.strip_prefix("X-Object-Meta-")
                        .map(|k| (k.to_ascii_lowercase(), v.clone()))
                })
                .collect();
            if up.digest_metadata {
                for (a, h) in &report.digests {
                    metadata.push((a.name().to_string(), h.clone()));
                }
            }
            let large = st.layout != Layout::Single;
            Ok(SwiftUploadReport {
                convert: report,
                url: shown.clone(),
                etag,
                layout: match st.layout {
                    Layout::Single => "single",
                    Layout::Slo => "slo",
                    Layout::Dlo => "dlo",
                },
                segments: if large { st.stored.len() as u64 } else { 0 },
                segment_size: st.segment_size,
                segment_container: large.then(|| st.seg_container.clone()),
                logins: st.session.logins.load(Ordering::Relaxed),
                metadata,
            })
        });
    if result.is_err() {
        st.abort();
    }
    drop(st);
    drop(registered);
    result
}

/// The object's metadata headers: the user's, then `source-format` and `format` unless
/// the user gave them.
fn object_headers(
    metadata: &[(String, String)],
    source_format: String,
    format: &str,
) -> Vec<(String, String)> {
    let mut headers: Vec<(String, String)> = Vec::new();
    for (k, v) in metadata {
        headers.push((format!("X-Object-Meta-{k}"), v.clone()));
    }
    if !metadata
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("source-format"))
        && !source_format.is_empty()
    {
        headers.push(("X-Object-Meta-Source-Format".into(), source_format));
    }
    if !metadata
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("format"))
    {
        headers.push(("X-Object-Meta-Format".into(), format.to_string()));
    }
    headers
}

/// A segmented upload's `--segment-size` against the cluster's limits (`bound`: the
/// output's length, or its upper bound when `len` is unknown).
fn check_segment_size(
    layout: Layout,
    seg: u64,
    bound: u64,
    len: Option<u64>,
    limits: &Limits,
) -> Result<()> {
    let seg_err = |why: String| Err(Error::arg(why).with_field("segment-size"));
    if seg == 0 || seg > limits.max_file_size {
        return seg_err(format!(
            "--segment-size {seg} must lie in 1..={} (the cluster's max_file_size)",
            limits.max_file_size
        ));
    }
    if layout == Layout::Slo {
        if !limits.slo {
            return seg_err("the cluster has no Static Large Object support: use --dlo".into());
        }
        if seg < limits.min_segment_size {
            return seg_err(format!(
                "--segment-size {seg} is under the cluster's SLO min_segment_size {}",
                limits.min_segment_size
            ));
        }
        let n = bound.div_ceil(seg);
        if n > limits.max_manifest_segments {
            return seg_err(format!(
                "--segment-size {seg} cuts the output ({}{bound} bytes) into {n} segments, more than the cluster's {} per manifest; use at least {}",
                if len.is_some() { "" } else { "up to " },
                limits.max_manifest_segments,
                bound.div_ceil(limits.max_manifest_segments)
            ));
        }
    }
    Ok(())
}

/// Open the Swift object `url` as an image (probed, or of `opts.format`), read by ranged
/// GETs through a small block cache; the returned [`FetchStats`] count what it fetches.
pub fn open_swift(
    url: &SwiftUrl,
    auth: &SwiftAuth,
    opts: &OpenOptions,
) -> Result<(Box<dyn BlockDevice>, Arc<FetchStats>)> {
    let shown = url.to_string();
    let rt = Arc::new(super::s3::runtime()?);
    let client = client()?;
    let session = rt
        .block_on(Session::login(auth.clone(), client.clone()))
        .map_err(|e| e.with_path(&shown))?;
    let mut f = HttpFetch {
        client,
        url: url.path(),
        name: shown,
        len: 0,
        etag: None,
        last_modified: None,
        secrets: session.secrets(),
        session: Some(session),
        rt: rt.clone(),
    };
    rt.block_on(f.head())?;
    super::http::open_fetch(f, opts)
}

/// Delete the segments in `<container>_segments` under `prefix` that no manifest uses
/// (what a SIGKILL or a crash mid-upload leaves: segments, but no object). Segments are
/// recognised by python-swiftclient's names (`OBJECT/slo/MTIME/SIZE/SEGSIZE/NNNNNNNN`,
/// and the DLO form without `slo/`); a group is kept when `OBJECT` is a manifest naming
/// it. Returns the segment names deleted. Run it when no upload to those names is under
/// way: an upload in progress has no manifest yet.
pub fn delete_orphan_segments(
    container: &str,
    prefix: &str,
    auth: &SwiftAuth,
) -> Result<Vec<String>> {
    let shown = format!("swift://{container}/{prefix}");
    let rt = super::s3::runtime()?;
    let session = rt
        .block_on(Session::login(auth.clone(), client()?))
        .map_err(|e| e.with_path(&shown))?;
    let secrets = session.secrets();
    let fail = |what: &str, why: String| {
        Error::new(ErrorKind::Io, scrub(format!("{what}: {why}"), &secrets)).with_path(&shown)
    };
    let segs = format!("{container}_segments");
    let mut groups: BTreeMap<String, (String, Vec<String>)> = BTreeMap::new();
    let mut marker = String::new();
    loop {
        let path = format!(
            "{}?format=json&limit=10000&prefix={}&marker={}",
            encode(&segs, true),
            encode(prefix, true),
            encode(&marker, true)
        );
        let resp = match rt.block_on(session.send(Method::GET, &path, &[], None)) {
            Ok(r) if r.status() == StatusCode::NOT_FOUND => return Ok(Vec::new()),
            Ok(r) if r.status().is_success() => r,
            Ok(r) => return Err(fail("listing the segments", status_text(r.status()))),
            Err(why) => return Err(fail("listing the segments", why)),
        };
        let list: Vec<serde_json::Value> = rt
            .block_on(resp.bytes())
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(|| fail("listing the segments", "the listing is not JSON".into()))?;
        if list.is_empty() {
            break;
        }
        for o in &list {
            let Some(name) = o["name"].as_str() else {
                continue;
            };
            marker = name.to_string();
            if let Some((group, object)) = segment_group(name) {
                groups
                    .entry(group)
                    .or_insert_with(|| (object, Vec::new()))
                    .1
                    .push(name.to_string());
            }
        }
    }
    let mut deleted = Vec::new();
    for (group, (object, names)) in groups {
        let opath = format!("{}/{}", encode(container, true), encode(&object, false));
        let resp = rt.block_on(session.send(Method::HEAD, &opath, &[], None));
        let used = match resp {
            Ok(r) if r.status() == StatusCode::NOT_FOUND => false,
            Ok(r) if r.status().is_success() => {
                let h = r.headers();
                if let Some(m) = header(h, "X-Object-Manifest") {
                    let m = percent_decode(&m);
                    m.trim_end_matches('/') == format!("{segs}/{group}").trim_end_matches('/')
                } else if header(h, "X-Static-Large-Object")
                    .is_some_and(|v| v.eq_ignore_ascii_case("true"))
                {
                    let p = format!("{opath}?multipart-manifest=get");
                    let r = rt.block_on(session.send(Method::GET, &p, &[], None));
                    match r {
                        Ok(r) if r.status().is_success() => {
                            let m: serde_json::Value = rt
                                .block_on(r.bytes())
                                .ok()
                                .and_then(|b| serde_json::from_slice(&b).ok())
                                .unwrap_or_default();
                            let want = format!("/{segs}/{group}");
                            m.as_array().is_some_and(|a| {
                                a.iter().any(|s| {
                                    s["name"]
                                        .as_str()
                                        .is_some_and(|n| percent_decode(n).starts_with(&want))
                                })
                            })
                        }
                        // Cannot tell: keep.
                        _ => true,
                    }
                } else {
                    false
                }
            }
            Ok(r) => return Err(fail(&format!("checking {object}"), status_text(r.status()))),
            Err(why) => return Err(fail(&format!("checking {object}"), why)),
        };
        if used {
            continue;
        }
        for n in names {
            let p = format!("{}/{}", encode(&segs, true), encode(&n, false));
            match rt.block_on(session.send(Method::DELETE, &p, &[], None)) {
                Ok(r) if r.status().is_success() || r.status() == StatusCode::NOT_FOUND => {
                    deleted.push(n)
                }
                Ok(r) => return Err(fail(&format!("deleting {n}"), status_text(r.status()))),
                Err(why) => return Err(fail(&format!("deleting {n}"), why)),
            }
        }
    }
    Ok(deleted)
}

/// The group (the name without its index, ending in `/`) and the object of a segment
/// named as swiftclient names them, else None.
fn segment_group(name: &str) -> Option<(String, String)> {
    let (group, idx) = name.rsplit_once('/')?;
    if idx.len() != 8 || !idx.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let num = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let mtime = |s: &str| {
        s.split_once('.')
            .is_some_and(|(a, b)| num(a) && (b.is_empty() || num(b)))
            || num(s)
    };
    let parts: Vec<&str> = group.rsplitn(5, '/').collect();
    // SLO with a size: [segsize, size, mtime, "slo", object]
    let object = if parts.len() == 5
        && num(parts[0])
        && num(parts[1])
        && mtime(parts[2])
        && parts[3] == "slo"
    {
        parts[4].to_string()
    } else if parts.len() >= 4 && num(parts[0]) && mtime(parts[1]) && parts[2] == "slo" {
        // SLO of a stream: [segsize, mtime, "slo", object...]
        group.rsplitn(4, '/').nth(3)?.to_string()
    } else if parts.len() >= 4 && num(parts[0]) && num(parts[1]) && mtime(parts[2]) {
        // DLO: [segsize, size, mtime, object...]
        group.rsplitn(4, '/').nth(3)?.to_string()
    } else {
        return None;
    };
    Some((format!("{group}/"), object))
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse() {
        let u = SwiftUrl::parse("swift://c/dir/o.raw").unwrap();
        assert_eq!(
            (u.container.as_str(), u.object.as_str()),
            ("c", "dir/o.raw")
        );
        assert_eq!(u.to_string(), "swift://c/dir/o.raw");
        assert_eq!(u.path(), "c/dir/o.raw");
        for bad in [
            "swift://c",
            "swift:///o",
            "swift://c/",
            "swift://c/d/",
            "s3://c/o",
        ] {
            assert!(SwiftUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn segment_names_are_recognised() {
        assert_eq!(
            segment_group("a/b.raw/slo/1700000000.123456/6442450944/67108864/00000003"),
            Some((
                "a/b.raw/slo/1700000000.123456/6442450944/67108864/".into(),
                "a/b.raw".into()
            ))
        );
        assert_eq!(
            segment_group("x.vmdk/slo/1700000000.000000/1048576/00000000"),
            Some((
                "x.vmdk/slo/1700000000.000000/1048576/".into(),
                "x.vmdk".into()
            ))
        );
        assert_eq!(
            segment_group("d/x.raw/1700000000.5/100/10/00000009"),
            Some(("d/x.raw/1700000000.5/100/10/".into(), "d/x.raw".into()))
        );
        assert_eq!(segment_group("random/object"), None);
        assert_eq!(segment_group("x/slo/abc/1/00000001"), None);
        assert_eq!(percent_decode("a%20b%2Fc"), "a b/c");
    }

    #[test]
    fn auth_debug_hides_secrets() {
        let a = SwiftAuth::TempAuth {
            auth_url: "http://h/auth/v1.0".into(),
            user: "t:u".into(),
            key: "sekrit-key".into(),
        };
        assert!(!format!("{a:?}").contains("sekrit"));
        let t = SwiftAuth::Token {
            storage_url: "http://h/v1/AUTH_t".into(),
            token: "AUTH_tk0123".into(),
        };
        assert!(!format!("{t:?}").contains("AUTH_tk0123"));
    }
}
