//! `register glance://NAME --location URL`: a Glance image over data already stored
//! elsewhere, with the digests and sizes of a local copy or of flags.

use std::path::Path;

use diskconv::remote::LocationInfo;
use diskconv::{Error, Format, Result};

use crate::glance::GlanceArgs;

/// Register a Glance image whose data is already stored at --location (s3://, swift://,
/// rbd://, http(s)://), with the digests and virtual size of a local copy or of flags.
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

/// Run `register glance://NAME --location URL`.
pub fn exec(a: RegisterArgs) -> Result<()> {
    let json = crate::flags::output_is_json(&a.output)?;
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
            .map(|v| crate::sizes::size_arg("--virtual-size", v))
            .transpose()?
            .ok_or_else(|| Error::arg("register needs --image FILE or --virtual-size"))?;
    }
    if let Some(f) = &a.glance.disk_format {
        info.disk_format = f.clone();
    }
    if info.disk_format.is_empty() {
        return Err(Error::arg("register needs --image FILE or --disk-format"));
    }
    let g = crate::glance::options(&a.glance)?;
    let session = crate::glance::session(&a.glance)?;
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
        crate::glance::human(&id, &rec);
    }
    Ok(())
}

/// The file's length, MD5 and SHA-512 (hex), in one read.
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
