//! OpenStack Glance as a destination: `convert ... glance://NAME` creates the image record,
//! streams the converted bytes into it (no temporary file), waits until the image is
//! `active` and checks Glance's `checksum`, `os_hash_value` and `size` against the digests
//! computed on the way. Any failure, or [`abort_glance_uploads`] (the CLI calls it on
//! SIGINT/SIGTERM), deletes the half-made image: Glance itself keeps a `queued` record
//! (and, after a refused upload, its data) otherwise.
//!
//! [`register_location`] makes an image from data already stored elsewhere (an object,
//! an RBD snapshot) through Glance's locations API.

use std::io::Read;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::keystone::{error_chain, server_message, Session};
use crate::convert::{ConvertOptions, ConvertReport};
use crate::device::BlockDevice;
use crate::error::{Error, ErrorKind, Result};
use crate::format::Format;
use crate::ops::stream::ConvertedReader;
use crate::writer::DigestAlgo;

const GIB: u64 = 1 << 30;

/// Whether `dest` names a Glance image (`glance://NAME`).
pub fn is_glance_url(dest: &str) -> bool {
    dest.starts_with("glance://")
}

/// The image name of `glance://NAME` (any text but empty; `/` is kept as part of it).
pub fn parse_glance_url(s: &str) -> Result<String> {
    let name = s
        .strip_prefix("glance://")
        .ok_or_else(|| Error::arg("expected glance://NAME").with_path(s))?;
    if name.is_empty() {
        return Err(Error::arg("glance:// needs an image name: glance://NAME").with_path(s));
    }
    if name.chars().count() > 255 {
        return Err(Error::arg("Glance image names are at most 255 characters").with_path(s));
    }
    Ok(name.to_string())
}

/// Glance's `disk_format` for an output format.
pub fn disk_format_for(format: Format) -> &'static str {
    match format {
        Format::Raw => "raw",
        Format::Qcow2 => "qcow2",
        Format::Vhd => "vhd",
        Format::Vmdk => "vmdk",
        Format::Vdi => "vdi",
        Format::Vhdx => "vhdx",
        // Glance's disk_format of an appliance is its disk's; the container is `ova`.
        Format::Ova => "vmdk",
        // Read only here, so never an upload's format (nor one of Glance's disk formats).
        Format::Qcow | Format::Qed => format.name(),
    }
}

/// How the bytes reach Glance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum UploadMethod {
    /// `glance-direct` when `/v2/info/import` offers it (interoperable import), else
    /// [`Direct`](Self::Direct).
    #[default]
    Auto,
    /// `PUT /v2/images/{id}/file`.
    Direct,
    /// `PUT /v2/images/{id}/stage`, then `POST /v2/images/{id}/import` with `glance-direct`.
    GlanceDirect,
}

impl UploadMethod {
    /// `auto`, `upload` (or `direct`), `glance-direct`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Self::Auto),
            "upload" | "direct" => Ok(Self::Direct),
            "glance-direct" => Ok(Self::GlanceDirect),
            o => Err(Error::arg(format!(
                "upload method '{o}': expected auto, upload or glance-direct"
            ))),
        }
    }
}

/// The record's fields and how to upload.
#[derive(Debug, Clone)]
pub struct GlanceOptions {
    /// Extra properties (`--property k=v`), stored as strings.
    pub properties: Vec<(String, String)>,
    /// public, private, shared or community; None: Glance's default (shared).
    pub visibility: Option<String>,
    /// Minimum disk in GiB; None: the virtual size rounded up to GiB.
    pub min_disk: Option<u64>,
    /// Minimum RAM in MiB.
    pub min_ram: Option<u64>,
    /// Set `protected` once the image is verified (a protected image cannot be deleted,
    /// so it is not set before).
    pub protected: bool,
    /// Tags.
    pub tags: Vec<String>,
    /// Upload method.
    pub method: UploadMethod,
    /// `disk_format` to claim instead of the output format's own (for a cloud that names
    /// a format otherwise; a wrong one makes Glance's inspector refuse the upload).
    pub disk_format: Option<String>,
    /// `container_format`; None: `bare`.
    pub container_format: Option<String>,
    /// How long to wait for the image to turn `active` after the data is sent.
    pub wait: Duration,
}

impl Default for GlanceOptions {
    fn default() -> Self {
        GlanceOptions {
            properties: Vec::new(),
            visibility: None,
            min_disk: None,
            min_ram: None,
            protected: false,
            tags: Vec::new(),
            method: UploadMethod::Auto,
            disk_format: None,
            container_format: None,
            wait: Duration::from_secs(600),
        }
    }
}

/// What an upload produced.
#[derive(Debug, Clone)]
pub struct GlanceReport {
    /// The conversion's report (virtual size, bytes sent, digests).
    pub convert: ConvertReport,
    /// The image id.
    pub id: String,
    /// The image record as Glance gave it once active.
    pub record: Value,
    /// `upload` or `glance-direct`.
    pub method: &'static str,
}

impl GlanceReport {
    /// The fields `--output=json` adds: `glance-id`, `glance-method`, `glance-image`.
    pub fn json_fields(&self) -> Value {
        json!({
            "glance-id": self.id,
            "glance-method": self.method,
            "glance-image": self.record,
        })
    }
}

/// One image being made, for [`abort_glance_uploads`].
struct Pending {
    image_url: String,
    token: String,
    cancel: crate::convert::CancelToken,
    aborted: AtomicBool,
}

static PENDING: Mutex<Vec<Arc<Pending>>> = Mutex::new(Vec::new());

/// Delete every image this process is making (their conversions stop), for a signal
/// handler's cleanup thread; the uploads return an error.
pub fn abort_glance_uploads() {
    let pending: Vec<Arc<Pending>> = PENDING.lock().map(|v| v.clone()).unwrap_or_default();
    if pending.is_empty() {
        return;
    }
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(30))
        .build();
    for p in pending {
        p.aborted.store(true, Ordering::SeqCst);
        p.cancel.cancel();
        if let Ok(c) = &client {
            let _ = c
                .delete(&p.image_url)
                .header("X-Auth-Token", &p.token)
                .send();
        }
    }
}

/// The Glance API of a session: JSON requests with the session's token, retried once with
/// a new token on 401.
struct Glance<'s> {
    s: &'s Session,
    base: String,
}

impl<'s> Glance<'s> {
    fn new(s: &'s Session) -> Result<Self> {
        let ep = s.endpoint("image")?;
        // Catalogs list Glance with or without its version.
        let base = ep
            .strip_suffix("/v2")
            .or_else(|| ep.strip_suffix("/v2.0"))
            .unwrap_or(&ep)
            .to_string();
        Ok(Glance { s, base })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn err(&self, msg: String, url: &str) -> Error {
        Error::new(ErrorKind::Io, self.s.redact(&msg)).with_path(self.s.redact(url))
    }

    /// Send a request built by `build` (given the token); on 401 once more with a new token.
    fn send(
        &self,
        what: &str,
        url: &str,
        build: &dyn Fn(&str) -> reqwest::blocking::RequestBuilder,
    ) -> Result<reqwest::blocking::Response> {
        for attempt in 0..2 {
            let token = self.s.token()?;
            let r = build(&token)
                .send()
                .map_err(|e| self.err(format!("{what}: {}", error_chain(&e)), url))?;
            if r.status().as_u16() == 401 && attempt == 0 {
                self.s.invalidate();
                continue;
            }
            return Ok(r);
        }
        unreachable!("the loop returns")
    }

    /// A JSON request; a non-success status is an error naming `what` and Glance's words.
    fn json(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<(&str, String)>,
        what: &str,
    ) -> Result<Value> {
        let url = self.url(path);
        let r = self.send(what, &url, &|tok| {
            let mut b = self
                .s
                .client()
                .request(method.clone(), &url)
                .header("X-Auth-Token", tok)
                .header("Accept", "application/json");
            if let Some((ct, body)) = &body {
                b = b.header("Content-Type", *ct).body(body.clone());
            }
            b
        })?;
        let status = r.status();
        let text = r.text().unwrap_or_default();
        if !status.is_success() {
            return Err(self.err(
                format!(
                    "{what}: Glance answered HTTP {} ({})",
                    status.as_u16(),
                    server_message(&text)
                ),
                &url,
            ));
        }
        if text.trim().is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(&text)
            .map_err(|_| self.err(format!("{what}: Glance's answer is not JSON"), &url))
    }

    fn get_image(&self, id: &str) -> Result<Value> {
        self.json(
            reqwest::Method::GET,
            &format!("/v2/images/{id}"),
            None,
            "reading the image record",
        )
    }

    fn import_methods(&self) -> Vec<String> {
        self.json(
            reqwest::Method::GET,
            "/v2/info/import",
            None,
            "reading /v2/info/import",
        )
        .ok()
        .and_then(|v| {
            v["import-methods"]["value"].as_array().map(|a| {
                a.iter()
                    .filter_map(|m| m.as_str().map(str::to_string))
                    .collect()
            })
        })
        .unwrap_or_default()
    }

    fn create(&self, body: &Value) -> Result<String> {
        let v = self.json(
            reqwest::Method::POST,
            "/v2/images",
            Some(("application/json", body.to_string())),
            "creating the image record",
        )?;
        v["id"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| self.err("Glance gave the new image no id".into(), "/v2/images"))
    }

    /// Delete `id`, unprotecting it first if needed; errors are reported, not returned
    /// (this runs while another error is on its way).
    fn delete(&self, id: &str) -> Option<String> {
        let path = format!("/v2/images/{id}");
        match self.json(reqwest::Method::DELETE, &path, None, "deleting the image") {
            Ok(_) => None,
            Err(e) if e.message().contains("HTTP 404") => None,
            Err(e) => Some(e.to_string()),
        }
    }

    fn patch(&self, id: &str, ops: &Value, what: &str) -> Result<Value> {
        self.json(
            reqwest::Method::PATCH,
            &format!("/v2/images/{id}"),
            Some((
                "application/openstack-images-v2.1-json-patch",
                ops.to_string(),
            )),
            what,
        )
    }

    /// Poll until the image is `active`; `killed`, `deleted` or a failed import is an error.
    fn wait_active(&self, id: &str, wait: Duration) -> Result<Value> {
        let until = Instant::now() + wait;
        let mut delay = Duration::from_millis(50);
        loop {
            let rec = self.get_image(id)?;
            let status = rec["status"].as_str().unwrap_or_default();
            match status {
                "active" => return Ok(rec),
                "killed" | "deleted" | "pending_delete" => {
                    return Err(self.err(
                        format!("Glance set the image {status}"),
                        &self.url(&format!("/v2/images/{id}")),
                    ))
                }
                _ => {}
            }
            if let Some(f) = rec["os_glance_failed_import"]
                .as_str()
                .filter(|f| !f.is_empty())
            {
                return Err(self.err(
                    format!("Glance's import failed in store(s) {f} (status {status})"),
                    &self.url(&format!("/v2/images/{id}")),
                ));
            }
            if Instant::now() > until {
                return Err(self.err(
                    format!("the image is still '{status}' after {} s", wait.as_secs()),
                    &self.url(&format!("/v2/images/{id}")),
                ));
            }
            std::thread::sleep(delay);
            delay = (delay * 2).min(Duration::from_secs(2));
        }
    }
}

/// The `POST /v2/images` body.
fn record_body(
    name: &str,
    disk_format: &str,
    virtual_size: u64,
    g: &GlanceOptions,
) -> Result<Value> {
    let mut b = json!({
        "name": name,
        "disk_format": disk_format,
        "container_format": g.container_format.as_deref().unwrap_or("bare"),
        "min_disk": g.min_disk.unwrap_or(virtual_size.div_ceil(GIB)),
        "tags": g.tags,
    });
    if let Some(v) = &g.visibility {
        if !["public", "private", "shared", "community"].contains(&v.as_str()) {
            return Err(Error::arg(format!(
                "--visibility '{v}': expected public, private, shared or community"
            )));
        }
        b["visibility"] = json!(v);
    }
    if let Some(r) = g.min_ram {
        b["min_ram"] = json!(r);
    }
    const RESERVED: &[&str] = &[
        "id",
        "name",
        "status",
        "disk_format",
        "container_format",
        "size",
        "virtual_size",
        "checksum",
        "os_hash_algo",
        "os_hash_value",
        "visibility",
        "protected",
        "min_disk",
        "min_ram",
        "tags",
        "owner",
        "locations",
        "file",
        "schema",
        "self",
        "direct_url",
        "created_at",
        "updated_at",
    ];
    for (k, v) in &g.properties {
        if k.is_empty() || RESERVED.contains(&k.as_str()) || k.starts_with("os_glance") {
            return Err(Error::arg(format!(
                "--property '{k}': not a free property (use the flag of that field)"
            ))
            .with_field(k.clone()));
        }
        b[k] = json!(v);
    }
    Ok(b)
}

/// Reads the conversion through a lock, so the report can be taken back after the HTTP
/// client consumed the body.
struct SharedReader(Arc<Mutex<Option<ConvertedReader>>>);

impl Read for SharedReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self.0.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            Some(r) => r.read(buf),
            None => Ok(0),
        }
    }
}

fn static_opts(o: &ConvertOptions<'_>) -> ConvertOptions<'static> {
    ConvertOptions {
        open: o.open.clone(),
        format: o.format,
        create: o.create.clone(),
        min_sparse: o.min_sparse,
        threads: o.threads,
        // The reader has no progress callback of a borrowed lifetime; the bytes sent are
        // what counts for an upload.
        progress: None,
        sync: o.sync,
        existing_target: o.existing_target,
        target_is_zero: o.target_is_zero,
        salvage: o.salvage,
        rate_limit: o.rate_limit,
        target_size: o.target_size,
        shrink: o.shrink,
        digests: o.digests.clone(),
        cancel: o.cancel.clone(),
        fail_at_write: o.fail_at_write,
    }
}

/// Convert `src` as `opts` says into a new Glance image `name`, in one pass.
///
/// The record is created with `disk_format` from the output format (or
/// [`GlanceOptions::disk_format`]), container `bare`, `min_disk` the virtual size in GiB
/// rounded up unless given; the bytes go up as they are converted (Content-Length when the
/// output's length is known, chunked otherwise); MD5 and SHA-512 are computed on the way
/// and compared with Glance's `checksum`, `os_hash_value` and `size` once `active`. Any
/// error deletes the image.
pub fn convert_to_glance(
    src: Arc<dyn BlockDevice>,
    name: &str,
    session: &Session,
    opts: &ConvertOptions<'_>,
    g: &GlanceOptions,
) -> Result<GlanceReport> {
    let glance = Glance::new(session)?;
    let mut copts = static_opts(opts);
    for d in [DigestAlgo::Md5, DigestAlgo::Sha512] {
        if !copts.digests.contains(&d) {
            copts.digests.push(d);
        }
    }
    let method = match g.method {
        UploadMethod::Auto if glance.import_methods().iter().any(|m| m == "glance-direct") => {
            UploadMethod::GlanceDirect
        }
        UploadMethod::Auto => UploadMethod::Direct,
        m => m,
    };
    let disk_format = g
        .disk_format
        .clone()
        .unwrap_or_else(|| disk_format_for(opts.format).to_string());
    refused_by_inspector(opts, &disk_format)?;
    let virtual_size = opts.target_size.unwrap_or(src.virtual_size());
    // An appliance is Glance's `ova` container around its disk's format.
    let ova;
    let g = match (opts.format, &g.container_format) {
        (Format::Ova, None) => {
            ova = GlanceOptions {
                container_format: Some("ova".into()),
                ..g.clone()
            };
            &ova
        }
        _ => g,
    };
    let body = record_body(name, &disk_format, virtual_size, g)?;
    // Options and source are checked (the writer is made, a planned layout's first pass
    // runs) before the record exists.
    let reader = ConvertedReader::new(src, copts.clone())?;
    let id = glance.create(&body)?;
    let pending = Arc::new(Pending {
        image_url: glance.url(&format!("/v2/images/{id}")),
        token: session.token().unwrap_or_default(),
        cancel: copts.cancel.clone(),
        aborted: AtomicBool::new(false),
    });
    if let Ok(mut v) = PENDING.lock() {
        v.push(pending.clone());
    }
    let r = upload_and_verify(&glance, &id, reader, method, &disk_format, g);
    if let Ok(mut v) = PENDING.lock() {
        v.retain(|p| !Arc::ptr_eq(p, &pending));
    }
    match r {
        Ok((convert, record)) => Ok(GlanceReport {
            convert,
            id,
            record,
            method: match method {
                UploadMethod::GlanceDirect => "glance-direct",
                _ => "upload",
            },
        }),
        Err(e) => {
            let e = if pending.aborted.load(Ordering::SeqCst) {
                Error::cancelled("upload interrupted; the image was deleted")
                    .with_path(format!("glance://{name}"))
            } else {
                e
            };
            match glance.delete(&id) {
                None => Err(e),
                Some(d) => Err(Error::new(
                    e.kind(),
                    format!("{}; and deleting image {id} failed: {d}", e.message()),
                )),
            }
        }
    }
}

/// Outputs Glance 33's format inspector refuses under their true `disk_format`, refused
/// here before a record exists. A fixed VHD is raw data with a footer and no header: the
/// inspector looks for `conectix` at offset 0 only, so it sees raw data and answers 415
/// ("does not match stream data raw").
fn refused_by_inspector(opts: &ConvertOptions<'_>, disk_format: &str) -> Result<()> {
    let o = &opts.create.options;
    let fixed_vhd = opts.format == Format::Vhd
        && (o.get("subformat").map(String::as_str) == Some("fixed")
            || (o.get("subformat").is_none()
                && opts.create.bool_option("azure").ok().flatten() == Some(true)));
    if fixed_vhd && disk_format == "vhd" {
        return Err(Error::unsupported(
            "Glance's format inspector cannot recognise a fixed VHD (its only header is the footer at the end) and refuses it as disk_format vhd: use -o subformat=dynamic, or -O raw",
        )
        .with_field("subformat"));
    }
    Ok(())
}

fn upload_and_verify(
    glance: &Glance<'_>,
    id: &str,
    reader: ConvertedReader,
    method: UploadMethod,
    disk_format: &str,
    g: &GlanceOptions,
) -> Result<(ConvertReport, Value)> {
    let len = reader.len();
    let shared = Arc::new(Mutex::new(Some(reader)));
    let (path, what) = match method {
        UploadMethod::GlanceDirect => (format!("/v2/images/{id}/stage"), "staging the data"),
        _ => (format!("/v2/images/{id}/file"), "uploading the data"),
    };
    let url = glance.url(&path);
    // A fresh token for the data request: it is checked once, when the request starts,
    // however long the body then takes.
    let token = glance.s.token()?;
    let body = match len {
        Some(n) => reqwest::blocking::Body::sized(SharedReader(shared.clone()), n),
        None => reqwest::blocking::Body::new(SharedReader(shared.clone())),
    };
    let sent = glance
        .s
        .client()
        .put(&url)
        .header("X-Auth-Token", token)
        .header("Content-Type", "application/octet-stream")
        .body(body)
        .send();
    let reader = shared
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
        .expect("put back by nobody else");
    let resp = match sent {
        Ok(r) => r,
        Err(e) => {
            // The conversion's own error first: it says what went wrong with the image.
            reader.finish()?;
            return Err(glance.err(format!("{what}: {}", error_chain(&e)), &url));
        }
    };
    let status = resp.status();
    let text = resp.text().unwrap_or_default();
    if !status.is_success() {
        drop(reader);
        let why = match status.as_u16() {
            415 => format!(
                "Glance refused the data as disk_format {disk_format} (HTTP 415: {})",
                server_message(&text)
            ),
            413 => format!(
                "Glance refused the data as too large (HTTP 413: {})",
                server_message(&text)
            ),
            s => format!(
                "{what}: Glance answered HTTP {s} ({})",
                server_message(&text)
            ),
        };
        return Err(glance.err(why, &url));
    }
    let report = reader.finish()?;
    if method == UploadMethod::GlanceDirect {
        glance.json(
            reqwest::Method::POST,
            &format!("/v2/images/{id}/import"),
            Some((
                "application/json",
                json!({"method": {"name": "glance-direct"}}).to_string(),
            )),
            "starting the glance-direct import",
        )?;
    }
    let mut record = glance.wait_active(id, g.wait)?;
    verify(&record, &report)
        .map_err(|m| glance.err(m, &glance.url(&format!("/v2/images/{id}"))))?;
    if g.protected {
        record = glance.patch(
            id,
            &json!([{"op": "replace", "path": "/protected", "value": true}]),
            "setting protected",
        )?;
    }
    Ok((report, record))
}

/// Compare Glance's record with what was sent.
fn verify(record: &Value, report: &ConvertReport) -> std::result::Result<(), String> {
    let ours = |a: DigestAlgo| {
        report
            .digests
            .iter()
            .find(|(d, _)| *d == a)
            .map(|(_, h)| h.as_str())
    };
    let size = record["size"].as_u64();
    if size != Some(report.size) {
        return Err(format!(
            "Glance stored {} bytes, diskconv sent {}",
            size.map_or("no".into(), |s| s.to_string()),
            report.size
        ));
    }
    let checksum = record["checksum"].as_str();
    if checksum.is_some() && checksum != ours(DigestAlgo::Md5) {
        return Err(format!(
            "Glance's checksum (md5) {} differs from the sent bytes' {}",
            checksum.unwrap_or_default(),
            ours(DigestAlgo::Md5).unwrap_or("?")
        ));
    }
    let algo = record["os_hash_algo"].as_str().unwrap_or_default();
    let value = record["os_hash_value"].as_str();
    let ours_multi = match algo {
        "sha512" => ours(DigestAlgo::Sha512),
        "sha256" => ours(DigestAlgo::Sha256),
        "sha1" => ours(DigestAlgo::Sha1),
        "md5" => ours(DigestAlgo::Md5),
        _ => None,
    };
    if let (Some(v), Some(o)) = (value, ours_multi) {
        if v != o {
            return Err(format!(
                "Glance's os_hash_value ({algo}) {v} differs from the sent bytes' {o}"
            ));
        }
    }
    if checksum.is_none() && value.is_none() {
        return Err("Glance's record has neither checksum nor os_hash_value".into());
    }
    Ok(())
}

/// What [`register_location`] needs to know about the data at a location.
#[derive(Debug, Clone, Default)]
pub struct LocationInfo {
    /// `disk_format` of the data.
    pub disk_format: String,
    /// Guest size, for `min_disk` (and a `diskconv_virtual_size` property).
    pub virtual_size: u64,
    /// Bytes at the location.
    pub size: Option<u64>,
    /// MD5 of those bytes, lowercase hex.
    pub md5: Option<String>,
    /// SHA-512 of those bytes, lowercase hex (Glance's `os_hash_value`).
    pub sha512: Option<String>,
}

/// Register a new image `name` whose data already lies at `location` (`s3://`, `swift://`,
/// `rbd://`, `http(s)://`, as Glance's stores name them), through Glance's add-location
/// API (`POST /v2/images/{id}/locations`, Glance 29 and later) or, where that is missing,
/// the `locations` patch of `show_multiple_locations`. The SHA-512 goes in as the
/// location's validation data: Glance 33 with `do_secure_hash` (its default) reads the
/// location and refuses other bytes; with it off Glance copies the digests unread, so the
/// record's match proves nothing. diskconv never reads the location. A cloud whose policy,
/// stores or hash check refuse the location gives a clear error and no image.
pub fn register_location(
    session: &Session,
    name: &str,
    location: &str,
    info: &LocationInfo,
    g: &GlanceOptions,
) -> Result<Value> {
    const SCHEMES: &[&str] = &[
        "s3://",
        "s3+http://",
        "s3+https://",
        "swift://",
        "swift+http://",
        "swift+https://",
        "rbd://",
        "http://",
        "https://",
        "file://",
        "cinder://",
    ];
    if !SCHEMES.iter().any(|s| location.starts_with(s)) {
        return Err(Error::arg(format!(
            "--location '{location}': expected an s3://, swift://, rbd:// or http(s):// URL"
        )));
    }
    let glance = Glance::new(session)?;
    let mut g2 = g.clone();
    g2.properties.push((
        "diskconv_virtual_size".into(),
        info.virtual_size.to_string(),
    ));
    let body = record_body(name, &info.disk_format, info.virtual_size, &g2)?;
    let id = glance.create(&body)?;
    match add_location(&glance, &id, location, info, g) {
        Ok(rec) => Ok(rec),
        Err(e) => {
            glance.delete(&id);
            Err(e)
        }
    }
}

fn add_location(
    glance: &Glance<'_>,
    id: &str,
    location: &str,
    info: &LocationInfo,
    g: &GlanceOptions,
) -> Result<Value> {
    let mut validation = serde_json::Map::new();
    if let Some(h) = &info.sha512 {
        validation.insert("os_hash_algo".into(), json!("sha512"));
        validation.insert("os_hash_value".into(), json!(h));
    }
    let mut add = json!({"url": location});
    if !validation.is_empty() {
        add["validation_data"] = Value::Object(validation.clone());
    }
    let new_api = glance.json(
        reqwest::Method::POST,
        &format!("/v2/images/{id}/locations"),
        Some(("application/json", add.to_string())),
        "adding the location",
    );
    match new_api {
        Ok(_) => {}
        // No add-location API (before Glance 29): the multiple-locations patch.
        Err(e) if e.message().contains("HTTP 404") || e.message().contains("HTTP 405") => {
            let mut loc = json!({"url": location, "metadata": {}});
            if let Some(m) = &info.md5 {
                validation.insert("checksum".into(), json!(m));
            }
            if !validation.is_empty() {
                loc["validation_data"] = Value::Object(validation);
            }
            glance.patch(
                id,
                &json!([{"op": "add", "path": "/locations/-", "value": loc}]),
                "adding the location (show_multiple_locations)",
            )?;
        }
        Err(e) => {
            let m = e.message().to_string();
            let hint = if m.contains("HTTP 403") {
                ": the cloud's policy does not let this user add this location (Glance 33 lets the service role add any store's location, other users only http(s) ones with the http store enabled)"
            } else if m.contains("HTTP 400") {
                ": Glance has no store for this URL's scheme, or the URL is malformed"
            } else {
                ""
            };
            return Err(Error::new(e.kind(), format!("{m}{hint}")));
        }
    }
    wait_location_task(glance, id, location, g.wait)?;
    let rec = glance.wait_active(id, g.wait)?;
    if let (Some(s), Some(theirs)) = (info.size, rec["size"].as_u64()) {
        if s != theirs {
            return Err(glance.err(
                format!("Glance reads {theirs} bytes at the location, expected {s}"),
                location,
            ));
        }
    }
    if let (Some(h), Some(theirs)) = (&info.sha512, rec["os_hash_value"].as_str()) {
        if h != theirs && rec["os_hash_algo"].as_str() == Some("sha512") {
            return Err(glance.err(
                format!("Glance's os_hash_value {theirs} differs from the given {h}"),
                location,
            ));
        }
    }
    if g.protected {
        return glance.patch(
            id,
            &json!([{"op": "replace", "path": "/protected", "value": true}]),
            "setting protected",
        );
    }
    Ok(rec)
}

/// Wait for Glance's `location_import` task: a refused location (its hash differs from the
/// validation data, it cannot be read) puts the image back to `queued`, not `killed`, so only
/// the task tells. A cloud without the image-tasks API (before Glance 22) is not waited on.
fn wait_location_task(glance: &Glance<'_>, id: &str, location: &str, wait: Duration) -> Result<()> {
    let until = Instant::now() + wait;
    // The task hashes the whole location; polling it fast only adds load (and, on a
    // sqlite-backed Glance, "database is locked" failures of the task itself).
    let mut delay = Duration::from_millis(500);
    loop {
        std::thread::sleep(delay);
        let tasks = match glance.json(
            reqwest::Method::GET,
            &format!("/v2/images/{id}/tasks"),
            None,
            "reading the image's tasks",
        ) {
            Ok(t) => t,
            Err(e) if e.message().contains("HTTP 404") => return Ok(()),
            Err(e) => return Err(e),
        };
        let task = tasks["tasks"].as_array().and_then(|ts| {
            ts.iter()
                .find(|t| t["type"].as_str() == Some("location_import"))
        });
        match task.and_then(|t| t["status"].as_str()) {
            None | Some("success") => return Ok(()),
            Some("failure") => {
                let msg = task.and_then(|t| t["message"].as_str()).unwrap_or("");
                return Err(glance.err(format!("Glance refused the location (its location_import task: {msg}): Glance could not read it, or its sha512 differs from the validation data"), location));
            }
            Some(_) => {}
        }
        if Instant::now() > until {
            return Err(glance.err(
                format!(
                    "Glance's location import still runs after {} s",
                    wait.as_secs()
                ),
                location,
            ));
        }
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_body() {
        assert_eq!(parse_glance_url("glance://my image").unwrap(), "my image");
        assert!(parse_glance_url("glance://").is_err());
        let g = GlanceOptions {
            properties: vec![("os_distro".into(), "debian".into())],
            tags: vec!["t1".into()],
            ..Default::default()
        };
        let b = record_body("n", "qcow2", (1 << 30) + 1, &g).unwrap();
        assert_eq!(b["min_disk"], 2);
        assert_eq!(b["container_format"], "bare");
        assert_eq!(b["os_distro"], "debian");
        let bad = GlanceOptions {
            properties: vec![("size".into(), "1".into())],
            ..Default::default()
        };
        assert!(record_body("n", "raw", 1, &bad).is_err());
        assert_eq!(disk_format_for(Format::Vhd), "vhd");
    }

    #[test]
    fn verify_compares() {
        let rep = ConvertReport {
            size: 3,
            digests: vec![
                (DigestAlgo::Md5, "aa".into()),
                (DigestAlgo::Sha512, "bb".into()),
            ],
            ..Default::default()
        };
        let ok =
            json!({"size": 3, "checksum": "aa", "os_hash_algo": "sha512", "os_hash_value": "bb"});
        assert!(verify(&ok, &rep).is_ok());
        let bad =
            json!({"size": 3, "checksum": "aa", "os_hash_algo": "sha512", "os_hash_value": "cc"});
        assert!(verify(&bad, &rep).unwrap_err().contains("os_hash_value"));
        let short = json!({"size": 2, "checksum": "aa"});
        assert!(verify(&short, &rep).unwrap_err().contains("stored 2 bytes"));
    }
}
