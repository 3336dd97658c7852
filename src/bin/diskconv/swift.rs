//! The swift:// destination of `convert`: the CLI's side of [`diskconv::remote::swift`]
//! (flags, the environment, what is printed).

use std::path::Path;

use diskconv::{ConvertOptions, Error, Result};

/// Flags of `convert` that only a swift:// DST takes (`--metadata` is shared with s3://).
#[derive(clap::Args, Debug, Default)]
pub struct SwiftArgs {
    /// swift:// DST: segment size of a large object (default 1G; given, any output longer
    /// than it is uploaded as segments plus a manifest).
    #[arg(long = "segment-size", value_name = "SIZE")]
    pub segment_size: Option<String>,
    /// swift:// DST: segments uploading at once (each holds a few MiB in memory).
    #[arg(long = "segments-in-flight", value_name = "N", default_value_t = 4)]
    pub segments_in_flight: usize,
    /// swift:// DST: a Dynamic Large Object (X-Object-Manifest) instead of a Static one.
    #[arg(long = "dlo")]
    pub dlo: bool,
    /// swift:// SRC or DST: the storage URL to use with OS_AUTH_TOKEN (default
    /// OS_STORAGE_URL); without a token, ST_AUTH, ST_USER and ST_KEY (tempauth) are used.
    #[arg(long = "os-storage-url", value_name = "URL")]
    pub os_storage_url: Option<String>,
}

/// Convert `src` into the Swift object `dst`.
pub fn convert(
    dev: &dyn diskconv::BlockDevice,
    dst: &Path,
    args: &SwiftArgs,
    metadata: Vec<(String, String)>,
    opts: &ConvertOptions,
    json: bool,
) -> Result<(diskconv::ConvertReport, Option<serde_json::Value>)> {
    let url = diskconv::remote::SwiftUrl::parse(&dst.to_string_lossy())?;
    let segment_size = args
        .segment_size
        .as_deref()
        .map(|p| {
            diskconv::parse_size(p)
                .map_err(|_| Error::arg(format!("--segment-size: '{p}' is not a size")))
        })
        .transpose()?;
    if args.segments_in_flight == 0 {
        return Err(Error::arg("--segments-in-flight must be at least 1"));
    }
    let up = diskconv::remote::SwiftUploadOptions {
        segment_size,
        dlo: args.dlo,
        in_flight: args.segments_in_flight,
        metadata,
        ..Default::default()
    };
    let auth = diskconv::remote::SwiftAuth::from_env(args.os_storage_url.as_deref())
        .map_err(|e| e.with_path(url.to_string()))?;
    let r = diskconv::remote::convert_to_swift(dev, &url, &auth, &up, opts)?;
    let extra = json.then(|| r.json_fields());
    Ok((r.convert, extra))
}
