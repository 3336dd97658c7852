//! The glance:// destination of `convert` (and the Glance flags `register` shares): the
//! CLI's side of [`diskconv::remote::glance`] (flags, the environment, what is printed).

use std::path::Path;
use std::sync::Arc;

use diskconv::remote::{GlanceOptions, Session, UploadMethod};
use diskconv::{ConvertOptions, Error, Result};

/// Flags of `convert` (and `register`) that only a glance:// DST takes.
#[derive(clap::Args, Debug, Default)]
pub struct GlanceArgs {
    /// glance:// DST: an image property KEY=VALUE, repeatable.
    #[arg(long = "property", value_name = "KEY=VALUE")]
    pub property: Vec<String>,
    /// glance:// DST: public, private, shared or community.
    #[arg(long = "visibility")]
    pub visibility: Option<String>,
    /// glance:// DST: minimum disk in GiB (default: the virtual size rounded up).
    #[arg(long = "min-disk", value_name = "GIB")]
    pub min_disk: Option<u64>,
    /// glance:// DST: minimum RAM in MiB.
    #[arg(long = "min-ram", value_name = "MIB")]
    pub min_ram: Option<u64>,
    /// glance:// DST: protect the image once it is verified.
    #[arg(long = "protected")]
    pub protected: bool,
    /// glance:// DST: a tag, repeatable.
    #[arg(long = "tag")]
    pub tag: Vec<String>,
    /// glance:// DST: claim this disk_format instead of the image's own format.
    #[arg(long = "disk-format")]
    pub disk_format: Option<String>,
    /// glance:// DST: container_format (default bare).
    #[arg(long = "container-format")]
    pub container_format: Option<String>,
    /// glance:// DST: auto (glance-direct when /v2/info/import offers it), upload
    /// (PUT /file) or glance-direct (stage + import).
    #[arg(long = "glance-method", default_value = "auto")]
    pub method: String,
    /// glance:// DST: Glance's URL, skipping the catalog (with OS_AUTH_TOKEN, no Keystone
    /// is asked); default OS_IMAGE_URL.
    #[arg(long = "os-image-url", value_name = "URL")]
    pub os_image_url: Option<String>,
    /// glance:// DST: the cloud of clouds.yaml (default OS_CLOUD).
    #[arg(long = "os-cloud", value_name = "NAME")]
    pub os_cloud: Option<String>,
    /// glance:// DST: do not inspect the guest for os_type, os_distro, os_version,
    /// architecture and hw_firmware_type (by default each one not given with --property
    /// is set from what `inspect --guest` finds).
    #[arg(long = "no-guest-properties")]
    pub no_guest_properties: bool,
}

/// Whether `dst` is a glance:// URL.
pub fn is_glance(dst: &Path) -> bool {
    dst.to_str()
        .is_some_and(diskconv::remote::glance::is_glance_url)
}

/// The Glance flags as the library's options.
pub fn options(a: &GlanceArgs) -> Result<GlanceOptions> {
    let properties = a
        .property
        .iter()
        .map(|p| {
            p.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| Error::arg(format!("--property '{p}': expected KEY=VALUE")))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(GlanceOptions {
        properties,
        visibility: a.visibility.clone(),
        min_disk: a.min_disk,
        min_ram: a.min_ram,
        protected: a.protected,
        tags: a.tag.clone(),
        method: UploadMethod::parse(&a.method)?,
        disk_format: a.disk_format.clone(),
        container_format: a.container_format.clone(),
        ..Default::default()
    })
}

/// The Keystone session: clouds.yaml's cloud with --os-cloud, else the OS_* environment.
pub fn session(a: &GlanceArgs) -> Result<Session> {
    let mut cfg = match &a.os_cloud {
        Some(c) => diskconv::remote::AuthConfig::from_clouds_yaml(c, None)?,
        None => diskconv::remote::AuthConfig::from_env()?,
    };
    if let Some(u) = &a.os_image_url {
        cfg.set_endpoint("image", u);
    }
    Session::new(cfg)
}

/// The image record in one line for people.
pub fn human(id: &str, rec: &serde_json::Value) {
    println!(
        "glance image {id} ({}): {}, {} bytes, disk_format {}, checksum {}, {} {}",
        rec["name"].as_str().unwrap_or_default(),
        rec["status"].as_str().unwrap_or_default(),
        rec["size"],
        rec["disk_format"].as_str().unwrap_or_default(),
        rec["checksum"].as_str().unwrap_or("-"),
        rec["os_hash_algo"].as_str().unwrap_or("-"),
        rec["os_hash_value"].as_str().unwrap_or("-"),
    );
}

/// Convert `src` into the Glance image `dst`; prints the id and record (human), or returns
/// the fields `--output=json` adds.
pub fn convert(
    src: &Path,
    dst: &Path,
    args: &GlanceArgs,
    opts: &ConvertOptions,
    json: bool,
) -> Result<(diskconv::ConvertReport, Option<serde_json::Value>)> {
    let name = diskconv::remote::glance::parse_glance_url(&dst.to_string_lossy())?;
    let mut g = options(args)?;
    let session = session(args)?;
    let dev: Arc<dyn diskconv::BlockDevice> = Arc::from(diskconv::open(src, &opts.open)?);
    if !args.no_guest_properties {
        // Reads only metadata and a few small files; a guest it cannot read gets no
        // properties, never guessed ones.
        match diskconv::guest::inspect::inspect(dev.clone()) {
            Ok(insp) => {
                g.properties = diskconv::guest::inspect::glance::merge(&g.properties, &insp)
            }
            Err(e) => eprintln!("diskconv: note: guest not inspected, no OS properties set: {e}"),
        }
    }
    let r = diskconv::remote::convert_to_glance(dev, &name, &session, opts, &g)?;
    if !json {
        human(&r.id, &r.record);
    }
    let extra = json.then(|| r.json_fields());
    Ok((r.convert, extra))
}
