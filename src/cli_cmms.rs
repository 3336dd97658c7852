//! `compare`, `map`, `measure` and `snapshot`: the CLI's side (flags, what is printed,
//! exit codes as qemu-img's) over the library's functions of the same names.

use std::io::Write;
use std::path::PathBuf;

use diskconv::{Error, Format, OpenOptions, Result};

fn open_options(format: Option<&str>, allow: bool) -> Result<OpenOptions> {
    let mut o = OpenOptions::new().allow_references(allow, None);
    if let Some(f) = format {
        o = o.format(Format::from_name(f)?);
    }
    Ok(o)
}

/// A byte count flag (suffixes k, M, G, ...).
fn size_arg(flag: &str, v: &str) -> Result<u64> {
    diskconv::parse_size(v).map_err(|_| Error::arg(format!("{flag}: '{v}' is not a size")))
}

fn check_output(output: &str) -> Result<bool> {
    match output {
        "json" => Ok(true),
        "human" => Ok(false),
        other => Err(Error::arg(format!(
            "--output must be human or json, not '{other}'"
        ))),
    }
}

/// `diskconv compare`'s flags.
#[derive(clap::Args, Debug)]
pub struct CompareArgs {
    /// IMG1's format (never probed when given).
    #[arg(short = 'f', long = "a-format")]
    format1: Option<String>,
    /// IMG2's format (never probed when given).
    #[arg(short = 'F', long = "b-format")]
    format2: Option<String>,
    /// Strict: different sizes or allocation also count as a mismatch.
    #[arg(short = 's', long = "strict")]
    strict: bool,
    /// Accepted for qemu-img compatibility (no progress is drawn).
    #[arg(short = 'p', long = "progress")]
    _progress: bool,
    /// Quiet: print only errors.
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    /// Accepted for qemu-img compatibility: images are opened read-only and never locked.
    #[arg(short = 'U', long = "force-share")]
    _force_share: bool,
    /// Allow opening files named inside the images (backing files, extents), confined
    /// to their folders.
    #[arg(long = "allow-references", alias = "allow-backing")]
    allow_references: bool,
    /// First image.
    img1: PathBuf,
    /// Second image.
    img2: PathBuf,
}

/// Run `compare`: exit 0 identical, 1 different, 2 an image cannot be opened, 3 block
/// status failed, 4 a read failed (qemu-img's codes).
pub fn compare(a: &CompareArgs) -> i32 {
    let opts = (|| {
        Ok::<_, Error>((
            open_options(a.format1.as_deref(), a.allow_references)?,
            open_options(a.format2.as_deref(), a.allow_references)?,
        ))
    })();
    let (o1, o2) = match opts {
        Ok(o) => o,
        Err(e) => {
            eprintln!("diskconv: {}", crate::cli_message(&e));
            return 2;
        }
    };
    let copts = diskconv::CompareOptions { strict: a.strict };
    match diskconv::compare(&a.img1, &o1, &a.img2, &o2, &copts) {
        Ok(r) => {
            if !a.quiet {
                print!("{}", r.human());
                let _ = std::io::stdout().flush();
            }
            i32::from(r.exit_code())
        }
        Err(e) => {
            // An image that does not open names itself (its path leads the error); a
            // failure later on says which image and where.
            if e.stage == diskconv::CompareStage::Open && e.error.path().is_some() {
                eprintln!("diskconv: {}", crate::cli_message(&e.error));
            } else {
                let name = if e.image == 1 { &a.img1 } else { &a.img2 };
                eprintln!("diskconv: {}: {e}", name.display());
            }
            i32::from(e.exit_code())
        }
    }
}

/// `diskconv map`'s flags.
#[derive(clap::Args, Debug)]
pub struct MapArgs {
    /// Image format (never probed when given).
    #[arg(short = 'f')]
    format: Option<String>,
    /// human or json.
    #[arg(long = "output", default_value = "human")]
    output: String,
    /// Guest offset to start at.
    #[arg(short = 's', long = "start-offset")]
    start_offset: Option<String>,
    /// Bytes to map at most.
    #[arg(short = 'l', long = "max-length")]
    max_length: Option<String>,
    /// Allow opening files named inside the image (backing files, extents), confined to
    /// its folder.
    #[arg(long = "allow-references", alias = "allow-backing")]
    allow_references: bool,
    /// Accepted for qemu-img compatibility: the image is opened read-only and never locked.
    #[arg(short = 'U', long = "force-share")]
    _force_share: bool,
    /// Image.
    image: PathBuf,
}

/// Run `map`.
pub fn map(a: &MapArgs) -> Result<()> {
    let json = check_output(&a.output)?;
    let opts = open_options(a.format.as_deref(), a.allow_references)?;
    let range = diskconv::MapRange {
        start: a
            .start_offset
            .as_deref()
            .map(|v| size_arg("--start-offset", v))
            .transpose()?
            .unwrap_or(0),
        max_length: a
            .max_length
            .as_deref()
            .map(|v| size_arg("--max-length", v))
            .transpose()?,
    };
    let entries = diskconv::map(&a.image, &opts, range)?;
    if json {
        print!("{}", diskconv::map_json(&entries));
    } else {
        // qemu-img prints the lines before a range it cannot show, then fails.
        let (text, err) = diskconv::map_human_partial(&entries);
        print!("{text}");
        if let Some(e) = err {
            return Err(e);
        }
    }
    Ok(())
}

/// `convert -l`'s value as an open option: `snapshot.id=ID`, `snapshot.name=NAME`, or a
/// bare ID-or-name (qemu-img's `-s`).
pub fn snapshot_option(v: &str) -> (&str, &str) {
    match v.split_once('=') {
        Some((k @ ("snapshot.id" | "snapshot.name"), val)) => (k, val),
        _ => ("snapshot", v),
    }
}

/// `diskconv snapshot`'s flags: only listing (`-l`); the image is never changed.
#[derive(clap::Args, Debug)]
pub struct SnapshotArgs {
    /// List the snapshots.
    #[arg(short = 'l', required = true)]
    list: bool,
    /// Image format (never probed when given).
    #[arg(short = 'f')]
    format: Option<String>,
    /// Quiet (accepted for qemu-img compatibility).
    #[arg(short = 'q')]
    _quiet: bool,
    /// Accepted for qemu-img compatibility: the image is opened read-only and never locked.
    #[arg(short = 'U', long = "force-share")]
    _force_share: bool,
    /// Image.
    image: PathBuf,
}

/// Run `snapshot -l`: the table as qemu-img prints it (nothing when there are none).
pub fn snapshot(a: &SnapshotArgs) -> Result<()> {
    debug_assert!(a.list);
    let opts = open_options(a.format.as_deref(), false)?;
    print!(
        "{}",
        diskconv::snapshot_table(&diskconv::snapshots(&a.image, &opts)?)
    );
    Ok(())
}

/// `diskconv measure`'s flags.
#[derive(clap::Args, Debug)]
pub struct MeasureArgs {
    /// human or json.
    #[arg(long = "output", default_value = "human")]
    output: String,
    /// Measure an empty guest of SIZE bytes instead of an image.
    #[arg(long = "size")]
    size: Option<String>,
    /// Input format (never probed when given).
    #[arg(short = 'f')]
    format: Option<String>,
    /// Output format (raw when not given, as qemu-img measure).
    #[arg(short = 'O', default_value = "raw")]
    out_format: String,
    /// Output options, key=value[,key=value...].
    #[arg(short = 'o')]
    options: Vec<String>,
    /// Measure a compressed output.
    #[arg(short = 'c')]
    compress: bool,
    /// Allow opening files named inside the image, confined to its folder.
    #[arg(long = "allow-references", alias = "allow-backing")]
    allow_references: bool,
    /// Accepted for qemu-img compatibility: the image is opened read-only and never locked.
    #[arg(short = 'U', long = "force-share")]
    _force_share: bool,
    /// Input image.
    image: Option<PathBuf>,
}

/// Run `measure`: qemu-img's lines, or its JSON object.
pub fn measure(a: &MeasureArgs) -> Result<()> {
    let json = check_output(&a.output)?;
    let format = Format::from_name(&a.out_format)?;
    let mut create = diskconv::CreateOptions::default();
    for o in &a.options {
        create.parse_option_string(o)?;
    }
    create.compress = a.compress;
    let mut convert = diskconv::ConvertOptions::new(format);
    convert.open = open_options(a.format.as_deref(), a.allow_references)?;
    let m = match (&a.size, &a.image) {
        (Some(s), None) => {
            create.size = size_arg("--size", s)?;
            diskconv::measure_device(None, format, &create, &convert)?
        }
        (None, Some(img)) => diskconv::measure(img, format, &create, &convert)?,
        _ => {
            return Err(Error::arg(
                "give either --size SIZE or an image to measure, not both or neither",
            ))
        }
    };
    if json {
        // qemu's schema types these as signed 64-bit: a size of 2^63 prints negative.
        let mut s = String::from("{\n");
        if let Some(b) = m.bitmaps {
            s += &format!("    \"bitmaps\": {},\n", b as i64);
        }
        s += &format!(
            "    \"required\": {},\n    \"fully-allocated\": {}\n}}\n",
            m.required as i64, m.fully_allocated as i64
        );
        print!("{s}");
    } else {
        println!("required size: {}", m.required);
        let bound = if m.fully_allocated_is_bound {
            " (upper bound: compressed)"
        } else {
            ""
        };
        println!("fully allocated size: {}{bound}", m.fully_allocated);
        if let Some(b) = m.bitmaps {
            println!("bitmaps size: {b}");
        }
    }
    Ok(())
}
