//! `convert SRC glance://NAME` and `register glance://NAME --location URL`: the CLI's side
//! of [`diskconv::remote::glance`] (flags, the environment, what is printed).

use std::path::Path;
use std::sync::Arc;

use diskconv::remote::{GlanceOptions, LocationInfo, Session, UploadMethod};
use diskconv::{ConvertOptions, Error, Format, Result};

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
}

/// Whether `dst` is a glance:// URL.
pub fn is_glance(dst: &Path) -> bool {
    dst.to_str()
        .is_some_and(diskconv::remote::glance::is_glance_url)
}

fn options(a: &GlanceArgs) -> Result<GlanceOptions> {
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

fn session(a: &GlanceArgs) -> Result<Session> {
    let mut cfg = match &a.os_cloud {
        Some(c) => diskconv::remote::AuthConfig::from_clouds_yaml(c, None)?,
        None => diskconv::remote::AuthConfig::from_env()?,
    };
    if let Some(u) = &a.os_image_url {
        cfg.set_endpoint("image", u);
    }
    Session::new(cfg)
}

fn human(id: &str, rec: &serde_json::Value) {
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
    let g = options(args)?;
    let session = session(args)?;
    let dev: Arc<dyn diskconv::BlockDevice> = Arc::from(diskconv::open(src, &opts.open)?);
    let r = diskconv::remote::convert_to_glance(dev, &name, &session, opts, &g)?;
    if !json {
        human(&r.id, &r.record);
    }
    let extra = json.then(|| r.json_fields());
    Ok((r.convert, extra))
}

/// Flags of `register`.
#[derive(clap::Args, Debug)]
pub struct RegisterArgs {
    /// glance://NAME
    pub dst: String,
    /// Where the data already is: s3://, swift://, rbd://, http(s)://.
    #[arg(long = "location", value_name = "URL")]
    pub location: String,
    /// A local copy of the data: its format, virtual size, size, md5 and sha512 are taken
    /// from it (one read).
    #[arg(long = "image", value_name = "FILE")]
    pub image: Option<std::path::PathBuf>,
    /// Virtual size (without --image).
    #[arg(long = "virtual-size", value_name = "SIZE")]
    pub virtual_size: Option<String>,
    /// Bytes at the location (without --image).
    #[arg(long = "size", value_name = "BYTES")]
    pub size: Option<u64>,
    /// SHA-512 of the bytes at the location, hex (without --image).
    #[arg(long = "sha512", value_name = "HEX")]
    pub sha512: Option<String>,
    /// MD5 of the bytes at the location, hex (without --image).
    #[arg(long = "md5", value_name = "HEX")]
    pub md5: Option<String>,
    /// human or json.
    #[arg(long = "output", default_value = "human")]
    pub output: String,
    #[command(flatten)]
    pub glance: GlanceArgs,
}

fn file_digests(p: &Path) -> Result<(u64, String, String)> {
    use md5::Digest;
    use std::io::Read;
    let mut f = std::fs::File::open(p).map_err(|e| Error::io("opening", e).with_path(p))?;
    let (mut m, mut s) = (md5::Md5::new(), sha2::Sha512::new());
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = f
            .read(&mut buf)
            .map_err(|e| Error::io("reading", e).with_path(p))?;
        if k == 0 {
            break;
        }
        m.update(&buf[..k]);
        s.update(&buf[..k]);
        n += k as u64;
    }
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    Ok((n, hex(&m.finalize()), hex(&s.finalize())))
}

/// `register glance://NAME --location URL`.
pub fn register(a: &RegisterArgs) -> Result<()> {
    let json = match a.output.as_str() {
        "json" => true,
        "human" => false,
        o => {
            return Err(Error::arg(format!(
                "--output must be human or json, not '{o}'"
            )))
        }
    };
    let name = diskconv::remote::glance::parse_glance_url(&a.dst)?;
    let mut info = LocationInfo {
        md5: a.md5.clone(),
        sha512: a.sha512.clone(),
        size: a.size,
        ..Default::default()
    };
    if let Some(img) = &a.image {
        let dev = diskconv::open(img, &diskconv::OpenOptions::new())?;
        let i = dev.info();
        info.virtual_size = i.virtual_size;
        info.disk_format =
            diskconv::remote::glance::disk_format_for(Format::from_name(&i.format)?).into();
        let (n, m, s) = file_digests(img)?;
        info.size = Some(n);
        info.md5 = Some(m);
        info.sha512 = Some(s);
    } else {
        info.virtual_size = a
            .virtual_size
            .as_deref()
            .map(|v| {
                diskconv::parse_size(v)
                    .map_err(|_| Error::arg(format!("--virtual-size: '{v}' is not a size")))
            })
            .transpose()?
            .ok_or_else(|| Error::arg("register needs --image FILE or --virtual-size"))?;
    }
    if let Some(f) = &a.glance.disk_format {
        info.disk_format = f.clone();
    }
    if info.disk_format.is_empty() {
        return Err(Error::arg("register needs --image FILE or --disk-format"));
    }
    let g = options(&a.glance)?;
    let session = session(&a.glance)?;
    let rec = diskconv::remote::register_location(&session, &name, &a.location, &info, &g)?;
    let id = rec["id"].as_str().unwrap_or_default().to_string();
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({"glance-id": id, "glance-image": rec})
            )
            .expect("json")
        );
    } else {
        human(&id, &rec);
    }
    Ok(())
}
