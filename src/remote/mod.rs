//! Object storage: convert straight into an S3 bucket (`s3://bucket/key`), in one pass and
//! with no temporary file.
//!
//! Behind the `remote` cargo feature (on by default; a library built with
//! `--no-default-features` compiles no HTTP stack). The client is Apache OpenDAL's S3
//! service (SigV4 signing, multipart upload, retries), driven from a tokio runtime that
//! lives inside each call: the API stays blocking like the rest of the crate.
//!
//! [`convert_to_s3`] streams the converted image ([`crate::ConvertedReader`]) into a
//! multipart upload whose part size is chosen from the output's exact length, a bounded
//! number of parts in flight; any failure, or [`abort_uploads`] (the CLI calls it on
//! SIGINT/SIGTERM), aborts the upload, so no object appears and no multipart upload is
//! left open.
//!
//! [`convert_to_glance`] streams the converted image into an OpenStack Glance image
//! (`glance://NAME`), authenticated by a Keystone [`Session`] (also for Swift).

mod cancel;
pub mod glance;
pub mod http;
pub mod keystone;
pub mod range;
pub mod s3;
pub mod swift;
pub mod swift_keystone;

pub use glance::{
    abort_glance_uploads, convert_to_glance, register_location, GlanceOptions, GlanceReport,
    LocationInfo, UploadMethod,
};
pub use keystone::{AuthConfig, AuthMethod, Secret, Session};
pub use range::{open_s3, FetchStats};

pub use http::open_http;
pub use s3::{
    abort_incomplete_uploads, choose_part_size, convert_to_s3, object_length, FailPart, S3Config,
    S3Url, UploadOptions, UploadReport, MAX_PARTS, MAX_PART_SIZE, MIN_PART_SIZE, SINGLE_PUT_LIMIT,
};
pub use swift::{
    convert_to_swift, delete_orphan_segments, open_swift, SwiftAuth, SwiftAuthenticate, SwiftToken,
    SwiftUploadOptions, SwiftUploadReport, SwiftUrl,
};
pub use swift_keystone::KeystoneSwift;

/// Whether `dest` names an object-storage location this build can read (`s3://`,
/// `swift://`, `https://`, `http://`), rather than a local path.
pub fn is_remote_url(dest: &str) -> bool {
    ["s3://", "swift://", "https://", "http://"]
        .iter()
        .any(|p| dest.starts_with(p))
}

/// Abort every upload in progress in this process (S3 and Swift) and wait until each has
/// cleaned what it wrote. For a signal handler's cleanup thread.
pub fn abort_uploads() {
    cancel::abort_all();
}

/// Open the image at `url` (`s3://`, `swift://`, `https://` or `http://`) read by ranges,
/// configured from the environment (the AWS variables; `ST_*` or `OS_STORAGE_URL` and
/// `OS_AUTH_TOKEN` for Swift).
pub fn open_url(
    url: &str,
    opts: &crate::OpenOptions,
) -> crate::Result<Box<dyn crate::BlockDevice>> {
    if url.starts_with("swift://") {
        let u = SwiftUrl::parse(url)?;
        let auth = SwiftAuth::from_env(None).map_err(|e| e.with_path(url))?;
        return open_swift(&u, &auth, opts).map(|(dev, _)| dev);
    }
    if url.starts_with("https://") || url.starts_with("http://") {
        return open_http(url, opts).map(|(dev, _)| dev);
    }
    let u = S3Url::parse(url)?;
    open_s3(&u, &S3Config::from_env(), opts).map(|(dev, _)| dev)
}
