//! `info [-f FMT] [--output=human|json] IMG`: facts about an image in qemu-img's layout,
//! its JSON keys included.

use std::path::{Path, PathBuf};

use diskconv::{ImageInfo, Result};

use crate::flags::{open_options, output_is_json};
use crate::sizes::human_size;

/// Show facts about an image.
#[derive(clap::Args, Debug)]
#[command(args_override_self = true)]
pub struct InfoArgs {
    /// Image format (never probed when given).
    #[arg(short = 'f')]
    format: Option<String>,
    /// human or json.
    #[arg(long = "output", default_value = "human")]
    output: String,
    /// Allow opening files named inside the image, confined to its folder.
    #[arg(long = "allow-references", alias = "allow-backing")]
    allow_references: bool,
    /// Accepted for qemu-img compatibility: the image is opened read-only and never locked.
    #[arg(short = 'U', long = "force-share")]
    _force_share: bool,
    /// With an OVA: which of its disks to describe (1-based; default the first).
    #[arg(long = "disk", value_name = "N")]
    disk: Option<usize>,
    /// Image.
    image: PathBuf,
}

/// Run `info`.
pub fn exec(args: InfoArgs) -> Result<()> {
    // Like qemu-img info: backing and parent images are named, never opened.
    let mut opts = open_options(args.format.as_deref(), args.allow_references)?.without_backing();
    if let Some(n) = args.disk {
        opts = opts.option("disk", &n.to_string());
    }
    let image = &args.image;
    let dev = diskconv::open(image, &opts)?;
    let info = dev.info();
    // Checked once the image is open: an image that does not open is the first error.
    if output_is_json(&args.output)? {
        let mut v = info_json(image, &info);
        // A container qemu does not know: the disk's keys, plus its own object.
        if let Some((k, c)) = dev.container_info() {
            v[k] = c;
        }
        println!("{}", serde_json::to_string_pretty(&v).expect("json"))
    } else {
        print!("{}", info_human(image, &info));
    }
    Ok(())
}

/// Disk space the file really uses (blocks allocated), like qemu-img's actual-size.
fn actual_size(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0)
}

/// The host file's length and qemu's protocol name for it: a block device's metadata
/// says 0 bytes, so it is sized by opening it.
fn host_file(path: &Path) -> (u64, &'static str) {
    use std::os::unix::fs::FileTypeExt;
    #[cfg(feature = "remote")]
    if let Some(object) = crate::remote::host_object(path) {
        return object;
    }
    match std::fs::metadata(path) {
        Ok(m) if m.file_type().is_block_device() => (
            std::fs::File::open(path)
                .and_then(|mut f| std::io::Seek::seek(&mut f, std::io::SeekFrom::End(0)))
                .unwrap_or(0),
            "host_device",
        ),
        // qemu's file driver reports a file's length rounded up to whole sectors.
        Ok(m) => (m.len().next_multiple_of(512), "file"),
        Err(_) => (0, "file"),
    }
}

/// qemu's `full-backing-filename`: the backing name joined to the image's folder as
/// given on the command line (not canonicalized), absolute names unchanged.
fn full_backing_filename(image: &Path, backing: &str) -> String {
    let b = Path::new(backing);
    match image.parent() {
        Some(dir) if !b.is_absolute() && !dir.as_os_str().is_empty() => {
            dir.join(b).display().to_string()
        }
        _ => backing.to_string(),
    }
}

/// Format-specific keys kept out of the human output: qemu-img 10 prints no such lines
/// (its vmdk driver has no adapter type or hardware version), so scripts that diff the
/// two outputs would trip on them. `--output=json` keeps them.
const JSON_ONLY_KEYS: &[&str] = &["adapter-type", "hwversion"];

/// `info --output=json`: qemu-img's keys in its order.
fn info_json(path: &Path, info: &ImageInfo) -> serde_json::Value {
    let (file_len, protocol) = host_file(path);
    let child = serde_json::json!({
        "children": [],
        "virtual-size": file_len,
        "filename": path.display().to_string(),
        "format": protocol,
        "actual-size": actual_size(path),
        "format-specific": {"type": "file", "data": {}},
        "dirty-flag": false,
    });
    let mut v = serde_json::json!({
        "children": [{"name": "file", "info": child}],
        "virtual-size": info.virtual_size,
        "filename": path.display().to_string(),
    });
    let m = v.as_object_mut().expect("object");
    if let Some(c) = info.cluster_size {
        m.insert("cluster-size".into(), c.into());
    }
    m.insert("format".into(), info.format.clone().into());
    m.insert("actual-size".into(), actual_size(path).into());
    if let Some(b) = &info.backing_format {
        m.insert("backing-filename-format".into(), b.clone().into());
    }
    if let Some(fs) = &info.format_specific {
        m.insert("format-specific".into(), fs.clone());
    }
    if let Some(b) = &info.backing_file {
        m.insert(
            "full-backing-filename".into(),
            full_backing_filename(path, b).into(),
        );
        m.insert("backing-filename".into(), b.clone().into());
    }
    m.insert("dirty-flag".into(), info.dirty.unwrap_or(false).into());
    if !info.snapshots.is_empty() {
        m.insert(
            "snapshots".into(),
            diskconv::snapshots_json(&info.snapshots),
        );
    }
    v
}

/// `info`'s human output: qemu-img's lines.
fn info_human(path: &Path, info: &ImageInfo) -> String {
    let mut s = format!(
        "image: {}\nfile format: {}\nvirtual size: {} ({} bytes)\ndisk size: {}\n",
        path.display(),
        info.format,
        human_size(info.virtual_size),
        info.virtual_size,
        human_size(actual_size(path))
    );
    if let Some(c) = info.cluster_size {
        s += &format!("cluster_size: {c}\n");
    }
    if let Some(b) = &info.backing_file {
        let full = full_backing_filename(path, b);
        if full == *b {
            s += &format!("backing file: {b}\n");
        } else {
            s += &format!("backing file: {b} (actual path: {full})\n");
        }
    }
    if let Some(b) = &info.backing_format {
        s += &format!("backing file format: {b}\n");
    }
    if info.dirty == Some(true) {
        s += "dirty flag: true\n";
    }
    s += &diskconv::snapshot_table(&info.snapshots);
    if let Some(data) = info.format_specific.as_ref().and_then(|f| f.get("data")) {
        let mut data = data.clone();
        if let Some(m) = data.as_object_mut() {
            m.retain(|k, _| !JSON_ONLY_KEYS.contains(&k.as_str()));
        }
        s += "Format specific information:\n";
        crate::json::human_value(&mut s, &data, 1);
    }
    let (file_len, protocol) = host_file(path);
    s += &format!(
        "Child node '/file':\n    filename: {}\n    protocol type: {protocol}\n    file length: {} ({file_len} bytes)\n    disk size: {}\n",
        path.display(),
        human_size(file_len),
        human_size(actual_size(path))
    );
    for w in &info.warnings {
        s += &format!("warning: {w}\n");
    }
    s
}
