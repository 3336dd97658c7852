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
            eprintln!("diskconv: {e}");
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
            let name = if e.image == 1 { &a.img1 } else { &a.img2 };
            eprintln!("diskconv: {}: {e}", name.display());
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
        print!("{}", diskconv::map_human(&entries)?);
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

/// `diskconv snapshot`'s flags: list (`-l`, the default), or create, delete or apply one
/// internal snapshot in place (`-c`, `-d`, `-a`), as qemu-img's.
#[derive(clap::Args, Debug)]
pub struct SnapshotArgs {
    /// List the snapshots.
    #[arg(short = 'l')]
    list: bool,
    /// Create a snapshot of the current content named NAME (with the next free ID).
    #[arg(short = 'c', value_name = "NAME")]
    create: Option<String>,
    /// Delete the first snapshot named NAME (snapshot.id=ID deletes by ID).
    #[arg(short = 'd', value_name = "NAME")]
    delete: Option<String>,
    /// Make snapshot ID-or-NAME's content the current content.
    #[arg(short = 'a', value_name = "SNAPSHOT")]
    apply: Option<String>,
    /// Image format (never probed when given).
    #[arg(short = 'f')]
    format: Option<String>,
    /// Quiet (accepted for qemu-img compatibility).
    #[arg(short = 'q')]
    _quiet: bool,
    /// Open read-only without locking (listing only, as qemu-img).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Image.
    image: PathBuf,
}

/// Run `snapshot`: `-l` prints the table as qemu-img does (nothing when there are none);
/// `-c/-d/-a` change the image in place and print nothing.
pub fn snapshot(a: &SnapshotArgs) -> Result<()> {
    use diskconv::{SnapshotOp, SnapshotSel};
    let given = [
        a.create.is_some(),
        a.delete.is_some(),
        a.apply.is_some(),
        a.list,
    ];
    if given.iter().filter(|&&g| g).count() > 1 {
        return Err(Error::arg("Cannot mix '-l', '-a', '-c', '-d'"));
    }
    // A bare value names as qemu-img's does; snapshot.id=ID / snapshot.name=NAME (the keys
    // of convert -l) name exactly.
    fn sel<'a>(v: &'a str, bare: fn(&'a str) -> SnapshotSel<'a>) -> SnapshotSel<'a> {
        match snapshot_option(v) {
            ("snapshot.id", id) => SnapshotSel::Id(id),
            ("snapshot.name", n) => SnapshotSel::Name(n),
            _ => bare(v),
        }
    }
    let op = if let Some(n) = &a.create {
        SnapshotOp::Create(n)
    } else if let Some(v) = &a.delete {
        SnapshotOp::Delete(sel(v, SnapshotSel::Name))
    } else if let Some(v) = &a.apply {
        SnapshotOp::Apply(sel(v, SnapshotSel::IdOrName))
    } else {
        let opts = open_options(a.format.as_deref(), false)?;
        print!(
            "{}",
            diskconv::snapshot_table(&diskconv::snapshots(&a.image, &opts)?)
        );
        return Ok(());
    };
    if a.force_share {
        return Err(Error::arg(format!(
            "Could not open '{}': force-share=on can only be used with read-only images",
            a.image.display()
        )));
    }
    let format = a.format.as_deref().map(Format::from_name).transpose()?;
    diskconv::snapshot_edit(&a.image, format, &op, None)
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
    /// Output format.
    #[arg(short = 'O')]
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
        let mut s = String::from("{\n");
        if let Some(b) = m.bitmaps {
            s += &format!("    \"bitmaps\": {b},\n");
        }
        s += &format!(
            "    \"required\": {},\n    \"fully-allocated\": {}\n}}\n",
            m.required, m.fully_allocated
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
