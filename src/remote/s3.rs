//! S3 output: the converted image goes straight into a bucket as a multipart upload.
//!
//! The engine writes the image in order into an upload sink that cuts it into parts of a
//! size chosen from the output's exact length (known before the first byte for every
//! streaming format), checks each part's MD5 against the final ETag, and keeps a bounded
//! number of parts in flight (OpenDAL's concurrent multipart writer). An output below
//! [`SINGLE_PUT_LIMIT`] goes up as one PUT, with its digests in the object's metadata.

use std::fmt;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use md5::{Digest, Md5};
use opendal::layers::{RetryLayer, TimeoutLayer};
use opendal::{Buffer, Operator};

use crate::convert::{ConvertOptions, ConvertReport};
use crate::device::BlockDevice;
use crate::error::{Error, ErrorKind, Result};
use crate::ops::convert::{prepare, run};
use crate::writer::Output;

use super::cancel::{Cancel, Registered};

/// The smallest part S3 accepts (all but the last part).
pub const MIN_PART_SIZE: u64 = 5 << 20;
/// The largest part S3 accepts.
pub const MAX_PART_SIZE: u64 = 5 << 30;
/// The most parts one multipart upload may have.
pub const MAX_PARTS: u64 = 10_000;
/// Outputs shorter than this go up as one PUT, like the AWS CLI's default threshold; it
/// is also the smallest part size chosen.
pub const SINGLE_PUT_LIMIT: u64 = 8 << 20;
/// The largest object S3 stores.
const MAX_OBJECT: u64 = 5 << 40;
/// How long one request (or one part's write) may take before it is retried: a part of
/// 5 GiB at 50 MB/s fits.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// A location `s3://bucket/key`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Url {
    /// Bucket name.
    pub bucket: String,
    /// Object key (no leading slash).
    pub key: String,
}

impl S3Url {
    /// Parse `s3://bucket/key`; the key must name an object (not empty, not ending in `/`).
    pub fn parse(s: &str) -> Result<Self> {
        let bad = |why: &str| Error::arg(format!("{why}: expected s3://BUCKET/KEY")).with_path(s);
        let rest = s
            .strip_prefix("s3://")
            .ok_or_else(|| bad("not an s3:// URL"))?;
        let (bucket, key) = rest.split_once('/').ok_or_else(|| bad("no object key"))?;
        if bucket.is_empty() {
            return Err(bad("no bucket name"));
        }
        if key.is_empty() || key.ends_with('/') {
            return Err(bad("the key must name an object"));
        }
        Ok(S3Url {
            bucket: bucket.to_string(),
            key: key.to_string(),
        })
    }
}

impl fmt::Display for S3Url {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "s3://{}/{}", self.bucket, self.key)
    }
}

/// Where the S3 service is and who we are. Never printed with its secrets: `Debug`
/// shows only whether they are set.
#[derive(Clone, Default)]
pub struct S3Config {
    /// Service URL (`http://127.0.0.1:8333`, a Ceph RGW or MinIO); None: AWS's own.
    pub endpoint: Option<String>,
    /// Region for signing; None: `us-east-1`.
    pub region: Option<String>,
    /// Access key id; None: OpenDAL's loader (env, `AWS_PROFILE` and the profile files).
    pub access_key_id: Option<String>,
    /// Secret access key.
    pub secret_access_key: Option<String>,
    /// Session token of temporary credentials.
    pub session_token: Option<String>,
    /// Address buckets as `bucket.host` instead of the path-style `host/bucket` that Ceph
    /// RGW, MinIO and SeaweedFS take.
    pub virtual_host_style: bool,
}

impl fmt::Debug for S3Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let set = |o: &Option<String>| if o.is_some() { "set" } else { "unset" };
        f.debug_struct("S3Config")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("access_key_id", &set(&self.access_key_id))
            .field("secret_access_key", &set(&self.secret_access_key))
            .field("session_token", &set(&self.session_token))
            .field("virtual_host_style", &self.virtual_host_style)
            .finish()
    }
}

impl S3Config {
    /// From the standard AWS variables: `AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL`,
    /// `AWS_REGION` or `AWS_DEFAULT_REGION`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
    /// `AWS_SESSION_TOKEN` (`AWS_PROFILE` and the profile files are read by the client when
    /// no key is set here).
    pub fn from_env() -> Self {
        let var = |names: &[&str]| {
            names
                .iter()
                .find_map(|n| std::env::var(n).ok().filter(|v| !v.is_empty()))
        };
        S3Config {
            endpoint: var(&["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"]),
            region: var(&["AWS_REGION", "AWS_DEFAULT_REGION"]),
            access_key_id: var(&["AWS_ACCESS_KEY_ID"]),
            secret_access_key: var(&["AWS_SECRET_ACCESS_KEY"]),
            session_token: var(&["AWS_SESSION_TOKEN"]),
            virtual_host_style: false,
        }
    }

    /// The secrets, so that no message built from a server's answer can carry them.
    pub(crate) fn secret_strings(&self) -> Vec<String> {
        [
            &self.secret_access_key,
            &self.session_token,
            &self.access_key_id,
        ]
        .into_iter()
        .flatten()
        .filter(|s| s.len() >= 4)
        .cloned()
        .collect()
    }

    pub(crate) fn operator(&self, bucket: &str) -> Result<Operator> {
        let mut b = opendal::services::S3::default()
            .bucket(bucket)
            .region(self.region.as_deref().unwrap_or("us-east-1"))
            // Never probe the EC2 metadata address: outside EC2 it only hangs.
            .disable_ec2_metadata();
        if let Some(e) = &self.endpoint {
            b = b.endpoint(e);
        }
        if let Some(k) = &self.access_key_id {
            b = b.access_key_id(k);
        }
        if let Some(k) = &self.secret_access_key {
            b = b.secret_access_key(k);
        }
        if let Some(t) = &self.session_token {
            b = b.session_token(t);
        }
        if self.virtual_host_style {
            b = b.enable_virtual_host_style();
        }
        // Every part (and single PUT) carries x-amz-checksum-crc32c, which the server
        // verifies before storing it; the payload itself stays unsigned (UNSIGNED-PAYLOAD),
        // so no SHA-256 pass over the data is spent on the signature.
        b = b.checksum_algorithm("crc32c");
        let op = Operator::new(b)
            .map_err(|e| Error::arg(format!("S3 configuration: {}", e.kind())))?
            // Inside the retries, so that a request that hangs is timed out and retried.
            .layer(
                TimeoutLayer::new()
                    .with_timeout(REQUEST_TIMEOUT)
                    .with_io_timeout(REQUEST_TIMEOUT),
            )
            .layer(
                RetryLayer::new()
                    .with_max_times(4)
                    .with_min_delay(Duration::from_millis(200))
                    .with_max_delay(Duration::from_secs(5))
                    .with_jitter(),
            );
        Ok(op)
    }
}

/// How to upload.
#[derive(Debug, Clone)]
pub struct UploadOptions {
    /// Part size; None: the smallest multiple of 1 MiB, at least [`SINGLE_PUT_LIMIT`], that
    /// fits the output in [`MAX_PARTS`] parts. Must lie in
    /// [`MIN_PART_SIZE`]..=[`MAX_PART_SIZE`] and fit the output in [`MAX_PARTS`].
    pub part_size: Option<u64>,
    /// Parts uploading at once (each holds one part in memory); at least 1.
    pub parts_in_flight: usize,
    /// User metadata (`x-amz-meta-KEY: VALUE`); keys are lowercase letters, digits, `-`, `_`.
    pub metadata: Vec<(String, String)>,
    /// Put the digests of [`ConvertOptions::digests`] into the metadata (`x-amz-meta-sha256`).
    /// S3 fixes a multipart object's metadata when its upload starts, before the last byte
    /// is known, so for a multipart raw or qcow2 object the digests come from a first pass
    /// of the conversion into no output (the source is read twice); the upload's own
    /// digests must match them before the upload is completed, else it is aborted. vhd,
    /// vmdk and vdi outputs carry fresh ids and timestamps (a second pass differs): as
    /// multipart objects they have their digests in the report only.
    pub digest_metadata: bool,
    /// Test hook: flip one byte of part N (1-based) after its checksum is computed, to
    /// show that the server refuses it.
    #[doc(hidden)]
    pub corrupt_part: Option<u64>,
    /// Test hook: answer the first attempts of one part with HTTP 503 SlowDown without
    /// sending them, to show that a throttled part is retried and the upload still lands.
    #[doc(hidden)]
    pub fail_part: Option<FailPart>,
}

/// [`UploadOptions::fail_part`]: which part is refused, how often, and how often it was.
#[doc(hidden)]
#[derive(Debug, Clone, Default)]
pub struct FailPart {
    /// The part (1-based).
    pub part: u64,
    /// How many of its attempts get 503.
    pub times: u32,
    /// How many did.
    pub served: Arc<std::sync::atomic::AtomicU32>,
}

impl Default for UploadOptions {
    fn default() -> Self {
        UploadOptions {
            part_size: None,
            parts_in_flight: 4,
            metadata: Vec::new(),
            digest_metadata: true,
            corrupt_part: None,
            fail_part: None,
        }
    }
}

/// What an upload produced: what an image registry stores.
#[derive(Debug, Clone)]
pub struct UploadReport {
    /// The conversion's report (virtual size, bytes written, digests, notes).
    pub convert: ConvertReport,
    /// The object written, `s3://bucket/key`.
    pub url: String,
    /// The ETag the server gave the finished object (without quotes).
    pub etag: Option<String>,
    /// The version id, on a versioned bucket.
    pub version_id: Option<String>,
    /// Parts uploaded (1 for a single PUT).
    pub parts: u64,
    /// Part size used.
    pub part_size: u64,
    /// The user metadata stored with the object.
    pub metadata: Vec<(String, String)>,
}

impl UploadReport {
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
            "version-id": self.version_id,
            "parts": self.parts,
            "part-size": self.part_size,
            "metadata": meta,
        })
    }
}

/// The part size for an output of `len` bytes: the smallest multiple of 1 MiB, at least
/// [`SINGLE_PUT_LIMIT`], that fits it in [`MAX_PARTS`] parts.
pub fn choose_part_size(len: u64) -> Result<u64> {
    if len > MAX_OBJECT {
        return Err(Error::limit(format!(
            "the output ({len} bytes) is larger than S3's largest object ({MAX_OBJECT} bytes)"
        )));
    }
    let per_part = len.div_ceil(MAX_PARTS).next_multiple_of(1 << 20);
    Ok(per_part.clamp(SINGLE_PUT_LIMIT, MAX_PART_SIZE))
}

fn check_part_size(part: u64, len: u64, exact: bool) -> Result<()> {
    if !(MIN_PART_SIZE..=MAX_PART_SIZE).contains(&part) {
        return Err(Error::arg(format!(
            "--part-size {part} is outside S3's limits ({MIN_PART_SIZE}..={MAX_PART_SIZE} bytes)"
        ))
        .with_field("part-size"));
    }
    let parts = len.div_ceil(part);
    if parts > MAX_PARTS {
        let what = if exact { "" } else { "up to " };
        return Err(Error::arg(format!(
            "--part-size {part} cuts the output ({what}{len} bytes) into {parts} parts, more than S3's {MAX_PARTS}; use at least {}",
            choose_part_size(len)?
        ))
        .with_field("part-size"));
    }
    Ok(())
}

fn check_metadata(meta: &[(String, String)]) -> Result<()> {
    for (k, v) in meta {
        let ok_key = !k.is_empty()
            && k.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
        if !ok_key {
            return Err(Error::arg(format!(
                "metadata key '{k}': use lowercase letters, digits, '-' and '_'"
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

/// OpenDAL's executor for part uploads, keeping their handles: an abort first stops the
/// parts still in flight, so none lands after the upload is aborted.
#[derive(Clone, Default)]
struct TrackedExecutor {
    handles: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl opendal::Execute for TrackedExecutor {
    fn execute(&self, f: opendal::raw::BoxedStaticFuture<()>) {
        let h = tokio::task::spawn(f);
        if let Ok(mut v) = self.handles.lock() {
            v.retain(|h| !h.is_finished());
            v.push(h);
        }
    }
}

impl TrackedExecutor {
    async fn stop_all(&self) {
        let handles: Vec<_> = self
            .handles
            .lock()
            .map(|mut v| std::mem::take(&mut *v))
            .unwrap_or_default();
        for h in &handles {
            h.abort();
        }
        for h in handles {
            let _ = h.await;
        }
    }
}

/// How long a request already sent may take to finish once the upload is cancelled: its
/// answer (the multipart upload id, a part's ETag) is what the abort then cleans.
const SETTLE: Duration = Duration::from_secs(10);

/// The shared state between the engine's writer thread (through [`UploadSink`]) and
/// [`convert_to_s3`], which starts and finishes the upload.
struct Upload {
    rt: Arc<tokio::runtime::Runtime>,
    op: Operator,
    key: String,
    cancel: Arc<Cancel>,
    tracked: TrackedExecutor,
    part_size: usize,
    parts_in_flight: usize,
    metadata: Vec<(String, String)>,
    /// Bytes not yet handed to the writer (under one part once the upload runs).
    buf: Vec<u8>,
    /// The part buffers, reused once their upload is done.
    pool: PartPool,
    /// The multipart writer, started once the output is known to need more than one PUT.
    writer: Option<opendal::Writer>,
    /// Each part's MD5, for the final ETag check.
    part_md5: Vec<[u8; 16]>,
    /// The digests a first pass put in the metadata, which the upload's must equal.
    expected_digests: Option<Vec<(crate::writer::DigestAlgo, String)>>,
    /// The first failure, in our words (the engine sees an opaque I/O error).
    error: Option<Error>,
    url: String,
    secrets: Vec<String>,
}

impl Upload {
    fn cancelled(&self) -> bool {
        self.cancel.is_set()
    }

    fn fail(&self, what: &str, e: &opendal::Error) -> Error {
        s3_error(&self.url, what, e, &self.secrets)
    }

    /// Start the multipart upload (nothing is sent until its second part is written).
    fn start(&mut self) -> Result<()> {
        let (op, key, meta) = (self.op.clone(), self.key.clone(), self.metadata.clone());
        let n = self.parts_in_flight;
        let w = self
            .rt
            .block_on(async move { op.writer_with(&key).concurrent(n).user_metadata(meta).await })
            .map_err(|e| self.fail("starting the upload", &e))?;
        self.writer = Some(w);
        self.buf
            .reserve(self.part_size.saturating_sub(self.buf.len()));
        Ok(())
    }

    /// Hand the buffered part to the writer, waiting for a free slot. Cancelled, a request
    /// under way may still finish (for [`SETTLE`]) so that the abort knows the upload.
    fn send_part(&mut self) -> Result<()> {
        let fresh = self.pool.take(self.part_size);
        let data = std::mem::replace(&mut self.buf, fresh);
        self.part_md5.push(Md5::digest(&data).into());
        let data = Buffer::from(bytes::Bytes::from_owner(PooledPart {
            data,
            pool: self.pool.clone(),
        }));
        let w = self.writer.as_mut().expect("upload started");
        let cancel = self.cancel.clone();
        let r = self.rt.block_on(async {
            let write = w.write(data);
            tokio::pin!(write);
            tokio::select! {
                r = &mut write => Some(r),
                _ = cancel.wait() => {
                    let _ = tokio::time::timeout(SETTLE, write).await;
                    None
                }
            }
        });
        match r {
            None => Err(interrupted(&self.url)),
            Some(Ok(())) if self.cancelled() => Err(interrupted(&self.url)),
            Some(Ok(())) => Ok(()),
            Some(Err(e)) => Err(self.fail("uploading a part", &e)),
        }
    }

    /// Send the whole parts gathered in `buf`.
    fn drain_parts(&mut self) -> Result<()> {
        while self.buf.len() >= self.part_size {
            let rest = self.buf.split_off(self.part_size);
            self.send_part()?;
            self.buf.extend_from_slice(&rest);
        }
        Ok(())
    }

    fn push(&mut self, mut data: &[u8]) -> Result<()> {
        if self.cancelled() {
            return Err(interrupted(&self.url));
        }
        // Until the length is known (a header written while the image writer is made)
        // and while a single PUT may do, everything waits in `buf`.
        if self.writer.is_none() {
            self.buf.extend_from_slice(data);
            if self.part_size == 0 || self.buf.len() < SINGLE_PUT_LIMIT as usize {
                return Ok(());
            }
            self.start()?;
            return self.drain_parts();
        }
        // Fill the part buffer up to its size exactly, so it never reallocates.
        while !data.is_empty() {
            let n = (self.part_size - self.buf.len()).min(data.len());
            self.buf.extend_from_slice(&data[..n]);
            data = &data[n..];
            if self.buf.len() == self.part_size {
                self.send_part()?;
            }
        }
        Ok(())
    }

    /// Abort the multipart upload, if one started: the parts in flight are stopped first,
    /// so none lands after the abort.
    fn abort(&mut self) {
        let Some(mut w) = self.writer.take() else {
            return;
        };
        let tracked = self.tracked.clone();
        let r = self.rt.block_on(async {
            tracked.stop_all().await;
            w.abort().await
        });
        if let Err(e) = r {
            let e = self.fail("aborting the multipart upload", &e);
            let bucket = self.url["s3://".len()..]
                .split('/')
                .next()
                .unwrap_or_default();
            eprintln!(
                "diskconv: warning: {e}; an incomplete multipart upload may be left: list and \
                 abort it with `aws s3api list-multipart-uploads --bucket {bucket}`"
            );
        }
    }

    /// The finished object's ETag, without quotes. RGW 16 answers CompleteMultipartUpload
    /// with an empty `<ETag></ETag>` (Ceph tracker 58879) while HEAD gives the right `-N`
    /// form: ask HEAD then, so the check against the parts still runs and an honest upload
    /// is never failed on the quirk.
    fn final_etag(&self, from_write: Option<&str>) -> Result<Option<String>> {
        let clean = |t: &str| Some(t.trim_matches('"').to_string()).filter(|t| !t.is_empty());
        if let Some(t) = from_write.and_then(clean) {
            return Ok(Some(t));
        }
        let meta = self
            .rt
            .block_on(self.op.stat(&self.key))
            .map_err(|e| self.fail("reading the finished object's ETag back (HEAD)", &e))?;
        Ok(meta.etag().and_then(clean))
    }

    /// After a successful conversion: send what is left, complete the upload (or make the
    /// single PUT, digests in its metadata), check the ETag. A request already sent is let
    /// finish even when cancelled, and what it made is then deleted: no object appears.
    fn finish(&mut self, report: &ConvertReport, digest_metadata: bool) -> Result<Finished> {
        if self.cancelled() {
            return Err(interrupted(&self.url));
        }
        let (op, key) = (self.op.clone(), self.key.clone());
        if let Some(want) = &self.expected_digests {
            if *want != report.digests {
                return Err(Error::new(
                    ErrorKind::Io,
                    "the source changed between the digest pass and the upload (the \
                     digests in the metadata would be wrong); aborted",
                )
                .with_path(&self.url));
            }
        }
        let (meta, expected, parts) = match self.writer.take() {
            None => {
                let mut metadata = self.metadata.clone();
                if digest_metadata && self.expected_digests.is_none() {
                    for (a, h) in &report.digests {
                        metadata.push((a.name().to_string(), h.clone()));
                    }
                }
                self.metadata = metadata.clone();
                let body = std::mem::take(&mut self.buf);
                let md5 = hex(&Md5::digest(&body));
                let r = self
                    .rt
                    .block_on(async { op.write_with(&key, body).user_metadata(metadata).await });
                (r.map_err(|e| self.fail("uploading", &e))?, md5, 1)
            }
            Some(w) => {
                self.writer = Some(w);
                self.drain_parts()?;
                if !self.buf.is_empty() || self.part_md5.is_empty() {
                    self.send_part()?;
                }
                let n = self.part_md5.len();
                let expected = if n == 1 {
                    // One part: OpenDAL sends it as a plain PUT, whose ETag is its MD5.
                    hex(&self.part_md5[0])
                } else {
                    let mut all = Md5::new();
                    for p in &self.part_md5 {
                        all.update(p);
                    }
                    format!("{}-{n}", hex(&all.finalize()))
                };
                let mut w = self.writer.take().expect("upload started");
                match self.rt.block_on(w.close()) {
                    Ok(m) => (m, expected, n as u64),
                    Err(e) => {
                        // Put it back for the caller's abort.
                        self.writer = Some(w);
                        return Err(self.fail("completing the upload", &e));
                    }
                }
            }
        };
        if self.cancelled() {
            let _ = self.rt.block_on(op.delete(&key));
            return Err(interrupted(&self.url));
        }
        let etag = match self.final_etag(meta.etag()) {
            Ok(t) => t,
            Err(e) => {
                let _ = self.rt.block_on(op.delete(&key));
                return Err(e);
            }
        };
        if let Some(got) = &etag {
            // Only the usual forms are checked: a server may use its own (encrypted objects).
            let usual = got.len() >= 32 && got[..32].bytes().all(|b| b.is_ascii_hexdigit());
            if usual && !got.eq_ignore_ascii_case(&expected) {
                let _ = self.rt.block_on(op.delete(&key));
                return Err(Error::new(
                    ErrorKind::Io,
                    format!(
                        "the server's ETag {got} does not match the parts sent ({expected}); \
                         the object was deleted"
                    ),
                )
                .with_path(&self.url));
            }
        }
        Ok(Finished {
            etag,
            version_id: meta.version().map(str::to_string),
            parts,
        })
    }
}

/// Part buffers, handed back when OpenDAL drops a part it has uploaded and reused for the
/// next. A fresh part-sized allocation per part (freed on the runtime's threads), and a
/// buffer that outgrew its capacity on the write crossing a part boundary (doubling to two
/// parts), made peak RSS grow with the image (77 MB at 1 GiB, 83 MB at 2 GiB, 150 MB at
/// 8 GiB in 5 MiB parts; neither a fixed mmap threshold nor one arena helped): now each
/// buffer is filled to the part size exactly and at most the parts alive at once exist.
#[derive(Clone)]
struct PartPool {
    free: Arc<Mutex<Vec<Vec<u8>>>>,
    keep: usize,
}

impl PartPool {
    fn new(keep: usize) -> Self {
        PartPool {
            free: Arc::new(Mutex::new(Vec::new())),
            keep,
        }
    }

    /// An empty buffer of at least `cap` bytes' capacity.
    fn take(&self, cap: usize) -> Vec<u8> {
        let reused = self.free.lock().ok().and_then(|mut f| f.pop());
        match reused {
            Some(v) if v.capacity() >= cap => v,
            _ => Vec::with_capacity(cap),
        }
    }
}

/// One part's bytes as OpenDAL holds them; back to the pool when dropped.
struct PooledPart {
    data: Vec<u8>,
    pool: PartPool,
}

impl AsRef<[u8]> for PooledPart {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

impl Drop for PooledPart {
    fn drop(&mut self) {
        let mut v = std::mem::take(&mut self.data);
        v.clear();
        if let Ok(mut f) = self.pool.free.lock() {
            if f.len() < self.pool.keep {
                f.push(v);
            }
        }
    }
}

/// [`UploadOptions::corrupt_part`] and [`UploadOptions::fail_part`]: the HTTP transport
/// under OpenDAL, flipping a byte of one part's body after the part was checksummed and
/// signed, as a network fault would, or answering a part's first attempts with 503.
struct FaultyTransport {
    inner: opendal::HttpTransporter,
    corrupt: Option<u64>,
    fail: Option<FailPart>,
}

impl opendal::HttpTransport for FaultyTransport {
    async fn fetch(
        &self,
        req: http::Request<Buffer>,
    ) -> opendal::Result<http::Response<opendal::HttpBody>> {
        let is_part = |n: u64| {
            let want = format!("partNumber={n}");
            req.uri()
                .query()
                .is_some_and(|q| q.split('&').any(|kv| kv == want))
        };
        if let Some(f) = self.fail.as_ref().filter(|f| is_part(f.part)) {
            let refuse = f
                .served
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                    (n < f.times).then_some(n + 1)
                })
                .is_ok();
            if refuse {
                let xml = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>SlowDown</Code>\
                           <Message>Please reduce your request rate.</Message></Error>";
                let body = Buffer::from(xml.as_bytes().to_vec());
                let len = body.len() as u64;
                let stream = futures_util::stream::iter([Ok(body)]);
                return http::Response::builder()
                    .status(503)
                    .header("content-type", "application/xml")
                    .body(opendal::HttpBody::new(stream, Some(len)))
                    .map_err(|e| {
                        opendal::Error::new(opendal::ErrorKind::Unexpected, e.to_string())
                    });
            }
        }
        let req = match self.corrupt {
            Some(n) if is_part(n) => req.map(|b| {
                let mut v = b.to_vec();
                if let Some(x) = v.last_mut() {
                    *x ^= 1;
                }
                Buffer::from(v)
            }),
            _ => req,
        };
        self.inner.fetch(req).await
    }
}

/// What [`Upload::finish`] learnt from the server.
struct Finished {
    etag: Option<String>,
    version_id: Option<String>,
    parts: u64,
}

fn interrupted(url: &str) -> Error {
    Error::new(ErrorKind::Io, "upload interrupted; aborted").with_path(url)
}

/// The engine's [`Write`] into the upload.
struct UploadSink(Arc<Mutex<Upload>>);

impl Write for UploadSink {
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

/// Convert `src` straight into the object `dest`, as `opts` says (any output format that
/// streams, see [`crate::ops::convert::STREAMING_OUTPUTS`]), in one pass: no temporary file,
/// memory bounded by [`UploadOptions::parts_in_flight`] parts whatever the image size.
///
/// On any failure, and when [`abort_uploads`](super::abort_uploads) is called meanwhile, the multipart upload is
/// aborted: no object appears and none is left half-written. The report carries the
/// object's ETag (checked against the parts' MD5s where the server gives the usual
/// `md5-of-md5s-N` form), version id, size and digests.
pub fn convert_to_s3(
    src: &dyn BlockDevice,
    dest: &S3Url,
    cfg: &S3Config,
    up: &UploadOptions,
    opts: &ConvertOptions,
) -> Result<UploadReport> {
    let url = dest.to_string();
    if opts.existing_target {
        return Err(Error::arg("-n cannot be used with an s3:// output").with_path(&url));
    }
    check_metadata(&up.metadata).map_err(|e| e.with_path(&url))?;
    // A multipart object's digests must be in its metadata before the first part: a
    // first pass of the conversion into no output computes them (no server-side copy of
    // the whole object afterwards, which for objects over 5 GiB would be a multipart copy).
    // Before the upload is registered: a signal now has nothing to abort. Only for outputs
    // whose bytes are a function of the source (raw, qcow2): vhd, vmdk and vdi get fresh
    // timestamps and ids, so a second pass differs; theirs stay in the report.
    let deterministic = matches!(opts.format, crate::Format::Raw | crate::Format::Qcow2);
    let pre_digests = if up.digest_metadata && !opts.digests.is_empty() && deterministic {
        // At full speed and silent: `-r` and the progress bar are for the upload.
        let mut pre_opts = opts.clone();
        pre_opts.rate_limit = 0;
        pre_opts.progress = None;
        let pre = crate::convert_to_writer(src, std::io::sink(), &pre_opts)?;
        (pre.size >= SINGLE_PUT_LIMIT).then_some(pre.digests)
    } else {
        None
    };
    let registered = Registered::new();
    let rt = Arc::new(runtime()?);
    let op = cfg.operator(&dest.bucket).map_err(|e| e.with_path(&url))?;
    let tracked = TrackedExecutor::default();
    let mut ctx =
        opendal::OperationContext::new().with_executor(opendal::Executor::with(tracked.clone()));
    if up.corrupt_part.is_some() || up.fail_part.is_some() {
        let inner = ctx.http_transport().clone();
        ctx = ctx.with_http_transport(opendal::HttpTransporter::new(FaultyTransport {
            inner,
            corrupt: up.corrupt_part,
            fail: up.fail_part.clone(),
        }));
    }
    let op = op.with_context(ctx);

    let mut metadata = up.metadata.clone();
    let source_format = src.info().format;
    if !metadata.iter().any(|(k, _)| k == "source-format") && !source_format.is_empty() {
        metadata.push(("source-format".into(), source_format));
    }
    if !metadata.iter().any(|(k, _)| k == "format") {
        metadata.push(("format".into(), opts.format.name().to_string()));
    }
    for (a, h) in pre_digests.iter().flatten() {
        metadata.retain(|(k, _)| k != a.name());
        metadata.push((a.name().to_string(), h.clone()));
    }
    let state = Arc::new(Mutex::new(Upload {
        rt,
        op,
        key: dest.key.clone(),
        cancel: registered.0.clone(),
        tracked,
        part_size: 0,
        parts_in_flight: up.parts_in_flight.max(1),
        metadata,
        buf: Vec::new(),
        pool: PartPool::new(up.parts_in_flight.max(1) + 2),
        writer: None,
        part_md5: Vec::new(),
        expected_digests: pre_digests,
        error: None,
        url: url.clone(),
        secrets: cfg.secret_strings(),
    }));
    let (out, sink) = Output::from_writer(Path::new(&url), Box::new(UploadSink(state.clone())));
    let (out, writer) = prepare(src, out, sink, opts)?;

    // The exact length is known before the first byte except for compressed outputs,
    // which stay under the guest size plus their tables.
    let len = writer.output_len();
    let bound = len.unwrap_or_else(|| {
        let v = writer.virtual_size();
        v.saturating_add(v / 16).saturating_add(64 << 20)
    });
    let part_size = match up.part_size {
        Some(p) => check_part_size(p, bound, len.is_some()).map(|()| p),
        None => choose_part_size(bound),
    }
    .map_err(|e| e.with_path(&url))?;
    {
        let mut st = state.lock().expect("fresh");
        st.part_size = part_size as usize;
        if !st.metadata.iter().any(|(k, _)| k == "virtual-size") {
            let v = writer.virtual_size().to_string();
            st.metadata.push(("virtual-size".into(), v));
        }
        if len.is_some_and(|l| l >= SINGLE_PUT_LIMIT) {
            st.start()?;
        }
    }

    let converted = run(src, out, writer, opts);
    let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
    let result = converted
        .map_err(|e| st.error.take().unwrap_or(e))
        .and_then(|report| {
            let f = st.finish(&report, up.digest_metadata)?;
            Ok(UploadReport {
                convert: report,
                url: url.clone(),
                etag: f.etag,
                version_id: f.version_id,
                parts: f.parts,
                part_size,
                metadata: st.metadata.clone(),
            })
        });
    if result.is_err() {
        st.abort();
    }
    drop(st);
    drop(registered);
    result
}

/// The length of the object `url` in bytes (one HEAD request): what `info` reports as
/// the host file's length.
pub fn object_length(url: &S3Url, cfg: &S3Config) -> Result<u64> {
    let name = url.to_string();
    let rt = runtime()?;
    let op = cfg.operator(&url.bucket).map_err(|e| e.with_path(&name))?;
    let meta = rt
        .block_on(op.stat(&url.key))
        .map_err(|e| s3_error(&name, "opening", &e, &cfg.secret_strings()))?;
    Ok(meta.content_length())
}

/// The client's runtime, private to one call: the API stays blocking.
pub(crate) fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("diskconv-s3")
        .enable_all()
        .build()
        .map_err(|e| Error::io("cannot start the S3 client's runtime", e))
}

/// Abort every multipart upload left open in `bucket` under keys starting with `prefix`
/// (what a SIGKILL or a crash leaves: no object, but stored parts); returns the keys whose
/// uploads were aborted. Needs the keys in `cfg` (not a profile). OpenDAL cannot list
/// uploads, so this signs its two requests with OpenDAL's signer (reqsign) itself.
pub fn abort_incomplete_uploads(bucket: &str, prefix: &str, cfg: &S3Config) -> Result<Vec<String>> {
    let name = format!("s3://{bucket}/{prefix}");
    let (Some(ak), Some(sk)) = (&cfg.access_key_id, &cfg.secret_access_key) else {
        return Err(Error::arg(
            "listing open uploads needs AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
        )
        .with_path(&name));
    };
    let region = cfg.region.as_deref().unwrap_or("us-east-1");
    let endpoint = cfg
        .endpoint
        .clone()
        .unwrap_or_else(|| format!("https://s3.{region}.amazonaws.com"));
    let base = format!(
        "{}/{}",
        endpoint.trim_end_matches('/'),
        encode(bucket, false)
    );
    let cred = reqsign_aws_v4::Credential {
        access_key_id: ak.clone(),
        secret_access_key: sk.clone(),
        session_token: cfg.session_token.clone(),
        expires_in: None,
    };
    let signer = reqsign_aws_v4::RequestSigner::new("s3", region);
    let ctx = reqsign_core::Context::new();
    let client = reqwest::Client::new();
    let rt = runtime()?;
    let secrets = cfg.secret_strings();
    let fail = |what: &str, why: String| {
        let mut msg = format!("{what}: {why}");
        for s in &secrets {
            msg = msg.replace(s.as_str(), "***");
        }
        Error::new(ErrorKind::Io, msg).with_path(&name)
    };
    let send = |method: http::Method, url: String, what: &str| -> Result<String> {
        use reqsign_core::SignRequest;
        rt.block_on(async {
            let req = http::Request::builder()
                .method(method)
                .uri(&url)
                .body(())
                .map_err(|_| fail(what, "bad request URL".into()))?;
            let (mut parts, ()) = req.into_parts();
            signer
                .sign_request(&ctx, &mut parts, Some(&cred), None)
                .await
                .map_err(|_| fail(what, "cannot sign the request".into()))?;
            let req =
                reqwest::Request::try_from(http::Request::from_parts(parts, Vec::<u8>::new()))
                    .map_err(|_| fail(what, "bad request URL".into()))?;
            let resp = client
                .execute(req)
                .await
                .map_err(|_| fail(what, "cannot reach the server".into()))?;
            let status = resp.status();
            let body = resp.text().await.unwrap_or_default();
            if !status.is_success() {
                let code = tag(&body, "Code").unwrap_or_default();
                return Err(fail(
                    what,
                    format!("the server answered HTTP {} {code}", status.as_u16()),
                ));
            }
            Ok(body)
        })
    };
    let mut aborted = Vec::new();
    let mut marker = String::new();
    for _ in 0..1000 {
        let url = format!("{base}?uploads&prefix={}{marker}", encode(prefix, true));
        let body = send(http::Method::GET, url, "listing open uploads")?;
        let mut rest = body.as_str();
        while let Some((_, after)) = rest.split_once("<Upload>") {
            let (upload, tail) = after.split_once("</Upload>").unwrap_or((after, ""));
            rest = tail;
            let (Some(key), Some(id)) = (tag(upload, "Key"), tag(upload, "UploadId")) else {
                continue;
            };
            let url = format!(
                "{base}/{}?uploadId={}",
                encode(&key, false),
                encode(&id, true)
            );
            send(http::Method::DELETE, url, "aborting an open upload")?;
            aborted.push(key);
        }
        if tag(&body, "IsTruncated").as_deref() != Some("true") {
            break;
        }
        marker = format!(
            "&key-marker={}&upload-id-marker={}",
            encode(&tag(&body, "NextKeyMarker").unwrap_or_default(), true),
            encode(&tag(&body, "NextUploadIdMarker").unwrap_or_default(), true)
        );
    }
    Ok(aborted)
}

/// The text of the first `<name>` element in `xml`, entities decoded.
fn tag(xml: &str, name: &str) -> Option<String> {
    let (_, after) = xml.split_once(&format!("<{name}>"))?;
    let (v, _) = after.split_once(&format!("</{name}>"))?;
    Some(
        v.replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&quot;", "\"")
            .replace("&apos;", "'")
            .replace("&amp;", "&"),
    )
}

/// Percent-encode for a URL path (`/` kept) or a query value (`/` encoded too).
fn encode(s: &str, query: bool) -> String {
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

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// One line naming what failed and why, in our words: never the request (its signature)
/// or the client's context, and with any credential scrubbed from what the server said.
pub(crate) fn s3_error(url: &str, what: &str, e: &opendal::Error, secrets: &[String]) -> Error {
    use opendal::ErrorKind as K;
    let text = e.to_string();
    // The S3 error code, as OpenDAL renders the server's XML (`code: "NoSuchBucket"`).
    let code = text
        .split_once("code: \"")
        .or_else(|| text.split_once("<Code>"))
        .and_then(|(_, r)| r.split(['"', '<']).next())
        .map(str::to_string)
        .filter(|c| !c.is_empty() && c.len() < 64 && c.bytes().all(|b| b.is_ascii_alphanumeric()));
    let status = text
        .split_once("status: ")
        .and_then(|(_, r)| r.get(..3))
        .filter(|s| s.bytes().all(|b| b.is_ascii_digit()));
    let why = match (code.as_deref(), e.kind()) {
        (Some("NoSuchBucket"), _) => "no such bucket".to_string(),
        (Some("NoSuchKey"), _) => "no such object".to_string(),
        (Some("AccessDenied" | "InvalidAccessKeyId" | "SignatureDoesNotMatch"), _)
        | (_, K::PermissionDenied) => "access denied".to_string(),
        (_, K::NotFound) => "not found".to_string(),
        (_, K::RateLimited) => "throttled by the server (retries exhausted)".to_string(),
        (_, K::ConfigInvalid) => "invalid S3 configuration".to_string(),
        (_, K::ConditionNotMatch) => "the object changed meanwhile".to_string(),
        _ if status.is_none() && (text.contains("sending request") || text.contains("connect")) => {
            "cannot reach the server".to_string()
        }
        (_, k) => match status {
            Some(st) => format!("the server answered HTTP {st}"),
            None => format!("request failed ({k})"),
        },
    };
    let mut msg = match code {
        Some(c) => format!("{what}: {why} ({c})"),
        None => format!("{what}: {why}"),
    };
    for s in secrets {
        msg = msg.replace(s.as_str(), "***");
    }
    Error::new(ErrorKind::Io, msg).with_path(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn part_size_fits_ten_thousand_parts() {
        assert_eq!(choose_part_size(0).unwrap(), SINGLE_PUT_LIMIT);
        assert_eq!(choose_part_size(6 << 30).unwrap(), SINGLE_PUT_LIMIT);
        // 100 GiB: 10,486 parts of 8 MiB would be too many; 11 MiB gives 9,310.
        let p = choose_part_size(100 << 30).unwrap();
        assert_eq!(p, 11 << 20);
        assert!((100u64 << 30).div_ceil(p) <= MAX_PARTS);
        assert!((100u64 << 30).div_ceil(p - (1 << 20)) > MAX_PARTS);
        assert!(choose_part_size(MAX_OBJECT + 1).is_err());
        assert!(choose_part_size(MAX_OBJECT).unwrap() <= MAX_PART_SIZE);
    }

    #[test]
    fn part_size_limits_are_checked() {
        assert!(check_part_size(5 << 20, 1 << 30, true).is_ok());
        let e = check_part_size((5 << 20) - 1, 1 << 30, true).unwrap_err();
        assert!(e.message().contains("outside S3's limits"), "{e}");
        assert!(check_part_size((5 << 30) + 1, 1 << 30, true).is_err());
        let e = check_part_size(5 << 20, 100 << 30, true).unwrap_err();
        assert!(e.message().contains("20480 parts"), "{e}");
        assert!(e.message().contains(&format!("{}", 11u64 << 20)), "{e}");
    }

    #[test]
    fn urls_and_metadata() {
        let u = S3Url::parse("s3://b/dir/k.raw").unwrap();
        assert_eq!((u.bucket.as_str(), u.key.as_str()), ("b", "dir/k.raw"));
        assert_eq!(u.to_string(), "s3://b/dir/k.raw");
        for bad in ["s3://b", "s3:///k", "s3://b/", "s3://b/dir/", "http://b/k"] {
            assert!(S3Url::parse(bad).is_err(), "{bad}");
        }
        assert!(check_metadata(&[("source-format".into(), "qcow2".into())]).is_ok());
        assert!(check_metadata(&[("Bad Key".into(), "v".into())]).is_err());
        assert!(check_metadata(&[("k".into(), "line\nbreak".into())]).is_err());
    }

    #[test]
    fn config_debug_hides_secrets() {
        let c = S3Config {
            access_key_id: Some("AKIDEXAMPLE".into()),
            secret_access_key: Some("wJalrXUtnFEMI/K7MDENG".into()),
            ..Default::default()
        };
        let d = format!("{c:?}");
        assert!(!d.contains("AKIDEXAMPLE") && !d.contains("wJalr"), "{d}");
    }
}
