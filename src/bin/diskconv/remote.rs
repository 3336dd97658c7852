//! The object-storage destinations of `convert` (s3://, and swift:// through
//! [`crate::swift`]): the CLI's side of [`diskconv::remote`] (flags, the environment, what
//! is printed). The upload itself is the library's.

use std::path::Path;

use diskconv::{ConvertOptions, Error, Result};

/// Flags of `convert` that only an object-storage DST takes.
#[derive(clap::Args, Debug, Default)]
pub struct RemoteArgs {
    /// s3:// DST: part size of the multipart upload (5M..5G; default: the smallest
    /// multiple of 1 MiB from 8M up that fits the output in 10,000 parts).
    #[arg(long = "part-size", value_name = "SIZE")]
    pub part_size: Option<String>,
    /// s3:// DST: parts uploading at once (each holds one part in memory).
    #[arg(long = "parts-in-flight", value_name = "N", default_value_t = 4)]
    pub parts_in_flight: usize,
    /// s3:// DST: object metadata KEY=VALUE (x-amz-meta-KEY), repeatable; the digests of
    /// --digest (default sha256), format, source-format and virtual-size are added.
    #[arg(long = "metadata", value_name = "KEY=VALUE")]
    pub metadata: Vec<String>,
    /// s3:// DST: the service URL (Ceph RGW, MinIO, SeaweedFS; path-style addressing);
    /// default AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL, else AWS.
    #[arg(long = "endpoint", value_name = "URL")]
    pub endpoint: Option<String>,
    #[command(flatten)]
    pub swift: crate::swift::SwiftArgs,
}

/// Whether `dst` is an object-storage URL rather than a path.
pub fn is_remote(dst: &Path) -> bool {
    dst.to_str()
        .is_some_and(|s| s.starts_with("s3://") || s.starts_with("swift://"))
}

/// What the flags say, checked before anything is opened.
pub fn upload_options(args: &RemoteArgs) -> Result<diskconv::remote::UploadOptions> {
    let part_size = args
        .part_size
        .as_deref()
        .map(|p| {
            diskconv::parse_size(p)
                .map_err(|_| Error::arg(format!("--part-size: '{p}' is not a size")))
        })
        .transpose()?;
    if args.parts_in_flight == 0 {
        return Err(Error::arg("--parts-in-flight must be at least 1"));
    }
    let metadata = args
        .metadata
        .iter()
        .map(|m| {
            m.split_once('=')
                .map(|(k, v)| (k.to_ascii_lowercase(), v.to_string()))
                .ok_or_else(|| Error::arg(format!("--metadata '{m}': expected KEY=VALUE")))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(diskconv::remote::UploadOptions {
        part_size,
        parts_in_flight: args.parts_in_flight,
        metadata,
        ..Default::default()
    })
}

/// Convert `src` into the object `dst` and print what `convert` prints, plus the object's
/// ETag (and, with `--output=json`, its url, ETag, version id, parts and metadata).
pub fn convert(
    src: &Path,
    dst: &Path,
    args: &RemoteArgs,
    opts: &ConvertOptions,
    json: bool,
) -> Result<(diskconv::ConvertReport, Option<serde_json::Value>)> {
    let dev = diskconv::open(src, &opts.open)?;
    convert_device(dev.as_ref(), dst, args, opts, json)
}

/// [`convert`] from an opened source (standard input spooled to a file).
pub fn convert_device(
    dev: &dyn diskconv::BlockDevice,
    dst: &Path,
    args: &RemoteArgs,
    opts: &ConvertOptions,
    json: bool,
) -> Result<(diskconv::ConvertReport, Option<serde_json::Value>)> {
    let up = upload_options(args)?;
    if dst.to_string_lossy().starts_with("swift://") {
        return crate::swift::convert(dev, dst, &args.swift, up.metadata, opts, json);
    }
    let url = diskconv::remote::S3Url::parse(&dst.to_string_lossy())?;
    let mut cfg = diskconv::remote::S3Config::from_env();
    if let Some(e) = &args.endpoint {
        cfg.endpoint = Some(e.clone());
    }
    // A registry wants a digest with the object: sha256 unless --digest chose.
    let mut opts = opts.clone();
    if opts.digests.is_empty() {
        opts.digests = vec![diskconv::DigestAlgo::Sha256];
    }
    let r = diskconv::remote::convert_to_s3(dev, &url, &cfg, &up, &opts)?;
    let extra = json.then(|| r.json_fields());
    Ok((r.convert, extra))
}

/// `info`'s host file line for an object: its length (0 if it cannot be had) and protocol.
pub fn host_object(path: &Path) -> Option<(u64, &'static str)> {
    let url =
        diskconv::remote::S3Url::parse(path.to_str().filter(|p| p.starts_with("s3://"))?).ok()?;
    let cfg = diskconv::remote::S3Config::from_env();
    Some((
        diskconv::remote::object_length(&url, &cfg).unwrap_or(0),
        "s3",
    ))
}
