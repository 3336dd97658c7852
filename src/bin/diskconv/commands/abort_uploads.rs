//! `abort-uploads s3://BUCKET/PREFIX` or `swift://CONTAINER/PREFIX`: remove what a killed
//! upload left stored (open multipart uploads; segments no manifest uses).

use diskconv::{Error, Result};

/// Abort the multipart uploads left open under s3://BUCKET/PREFIX, or delete the
/// segments no manifest uses under swift://CONTAINER/PREFIX (what a killed `convert`
/// leaves: no object, but stored parts); prints what it removed.
#[derive(clap::Args, Debug)]
pub struct AbortUploadsArgs {
    /// s3://BUCKET/KEY-PREFIX or swift://CONTAINER/OBJECT-PREFIX
    url: String,
}

/// Run `abort-uploads`.
pub fn exec(args: AbortUploadsArgs) -> Result<()> {
    if args.url.starts_with("swift://") {
        swift(&args.url)
    } else {
        s3(&args.url)
    }
}

/// `abort-uploads s3://BUCKET/PREFIX`: abort what a killed upload left open.
fn s3(url: &str) -> Result<()> {
    let rest = url
        .strip_prefix("s3://")
        .filter(|r| !r.is_empty() && !r.starts_with('/'))
        .ok_or_else(|| {
            Error::arg("expected s3://BUCKET/ or s3://BUCKET/KEY-PREFIX").with_path(url)
        })?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    let cfg = diskconv::remote::S3Config::from_env();
    for key in diskconv::remote::abort_incomplete_uploads(bucket, prefix, &cfg)? {
        println!("aborted s3://{bucket}/{key}");
    }
    Ok(())
}

/// `abort-uploads swift://CONTAINER/PREFIX`: delete the segments no manifest uses.
fn swift(url: &str) -> Result<()> {
    let rest = url
        .strip_prefix("swift://")
        .filter(|r| !r.is_empty() && !r.starts_with('/'))
        .ok_or_else(|| {
            Error::arg("expected swift://CONTAINER/ or swift://CONTAINER/OBJECT-PREFIX")
                .with_path(url)
        })?;
    let (container, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    let auth = diskconv::remote::SwiftAuth::from_env(None).map_err(|e| e.with_path(url))?;
    for name in diskconv::remote::delete_orphan_segments(container, prefix, &auth)? {
        println!("deleted swift://{container}_segments/{name}");
    }
    Ok(())
}
