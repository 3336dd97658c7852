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

pub mod glance;
pub mod keystone;
pub mod range;
pub mod s3;

pub use glance::{
    abort_glance_uploads, convert_to_glance, register_location, GlanceOptions, GlanceReport,
    LocationInfo, UploadMethod,
};
pub use keystone::{AuthConfig, AuthMethod, Secret, Session};
pub use range::{open_s3, FetchStats};

pub use s3::{
    abort_incomplete_uploads, abort_uploads, choose_part_size, convert_to_s3, object_length,
    S3Config, S3Url, UploadOptions, UploadReport, MAX_PARTS, MAX_PART_SIZE, MIN_PART_SIZE,
    SINGLE_PUT_LIMIT,
};

/// Whether `dest` names an object-storage location this build can write (`s3://...`),
/// rather than a local path.
pub fn is_remote_url(dest: &str) -> bool {
    dest.starts_with("s3://")
}
