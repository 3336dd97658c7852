//! `convert SRC DST`: the CLI's side of [`diskconv::convert`] and its stream and upload
//! variants. [`exec`] lowers the flags into [`ConvertOptions`] ([`lower`]), picks the
//! destination ([`write`]: a file, stdout, object storage, or through `--sparsify`), and
//! prints the report ([`print_report`]).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use diskconv::{ConvertOptions, CreateOptions, Error, Format, Result};

use crate::sizes::{cvtnum, sparse_size_arg};
use crate::stdout::side_println;

/// `convert --help`'s description of its two files, which clap cannot list as required.
const CONVERT_ARGS_HELP: &str = concat!(
    "Arguments:\n  SRC  Input image; `-`: a raw image on stdin (-f raw), spooled first to a deleted file in\n       $TMPDIR holding its non-zero 64 KiB blocks (up to its length), or read once with --size\n  DST  Output image\n\n",
    "Supported formats: raw qcow2 vpc (alias vhd) vmdk vdi vhdx ova; read only: qcow qed"
);

/// Convert SRC into a new image DST of format -O.
#[derive(clap::Args, Debug)]
#[command(
    override_usage = "diskconv convert [OPTIONS] SRC DST\n       diskconv convert -O FMT -o help",
    after_help = CONVERT_ARGS_HELP,
    args_override_self = true
)]
pub struct ConvertArgs {
    /// Input format (never probed when given).
    #[arg(short = 'f')]
    src_format: Option<String>,
    /// Output format.
    #[arg(short = 'O', default_value = "raw")]
    out_format: String,
    /// Output options, key=value[,key=value...]; `-o help` lists them (no SRC or DST needed).
    #[arg(short = 'o')]
    options: Vec<String>,
    /// Compress the output (qcow2, streamOptimized vmdk; an error for raw, vpc, vdi).
    #[arg(short = 'c')]
    compress: bool,
    /// Show progress: a bar when stdout (stderr with DST `-`) is a terminal, otherwise
    /// qemu-img's `(x.xx/100%)` lines.
    #[arg(short = 'p')]
    progress: bool,
    /// Quiet: no progress and no notes (errors are still printed).
    #[arg(short = 'q')]
    quiet: bool,
    /// Zero runs of at least SIZE inside data stay unallocated (default 4k; a multiple
    /// of 512 up to 16M); 0 writes everything. Holes of the source are never written.
    #[arg(short = 'S', default_value = "4k", allow_hyphen_values = true)]
    sparse_size: String,
    /// Output cache mode like qemu-img's: `unsafe` (default) skips the final flush;
    /// any other mode (writeback, none, writethrough, directsync) flushes before the rename.
    #[arg(short = 't', default_value = "unsafe")]
    cache: String,
    /// Source cache mode (accepted for qemu-img compatibility; the source is only read).
    #[arg(short = 'T', default_value = "writeback")]
    src_cache: String,
    /// Accepted for qemu-img compatibility: the source is opened read-only and never locked.
    #[arg(short = 'U', long = "force-share")]
    _force_share: bool,
    /// Continue past unreadable source ranges: they are written as zeros and each is
    /// reported on stderr.
    #[arg(long = "salvage")]
    salvage: bool,
    /// Give the output this virtual size (growing pads with unallocated space;
    /// shrinking needs a zero tail, or --shrink).
    #[arg(long = "target-size")]
    target_size: Option<String>,
    /// With --target-size below the source's size: drop its tail even if it holds data.
    #[arg(long = "shrink")]
    shrink: bool,
    /// Limit writing to RATE bytes per second (suffixes k, M, G, ...).
    #[arg(short = 'r', long = "rate", allow_hyphen_values = true)]
    rate: Option<String>,
    /// Worker threads (0: one per core).
    #[arg(short = 'm', long = "threads", default_value_t = 0)]
    threads: usize,
    /// Accepted for qemu-img compatibility; no effect: writes reach the output in
    /// ascending order, which streamed outputs need.
    #[arg(short = 'W')]
    _unordered: bool,
    /// Convert an internal snapshot (qcow2) instead of the active image:
    /// snapshot.id=ID or snapshot.name=NAME (a bare value is an ID or a name).
    #[arg(short = 'l', short_alias = 's', value_name = "SNAPSHOT")]
    snapshot: Option<String>,
    /// Allow opening files named inside the input image (backing files, extents),
    /// confined to its folder.
    #[arg(long = "allow-references", alias = "allow-backing")]
    allow_references: bool,
    /// With an OVA input: which of its disks to read (1-based; default the first).
    #[arg(long = "disk", value_name = "N")]
    disk: Option<usize>,
    /// Write into the existing DST in place instead of creating it: a raw file or
    /// block device, or an image of the -O format (qcow2, vpc, vdi, vmdk, vhdx) that
    /// keeps its options; at least SRC's size.
    #[arg(short = 'n')]
    existing_target: bool,
    /// With -n: DST already reads as zeros, so zero ranges are not written.
    #[arg(long = "target-is-zero")]
    target_is_zero: bool,
    /// Also drop the blocks the guest's filesystems mark free (as `diskconv sparsify`);
    /// the per-partition report goes to stderr.
    #[arg(long = "sparsify")]
    sparsify: bool,
    /// Digests of the output, comma-separated: md5, sha1, sha256, sha512 (computed
    /// while a stream is written; for a file, by one read of the finished output).
    #[arg(long = "digest", value_name = "ALGOS")]
    digest: Option<String>,
    /// human, or json: format, virtual-size, size (bytes written), digests, filename
    /// (on stderr when DST is `-`).
    #[arg(long = "output", default_value = "human")]
    output: String,
    #[cfg(feature = "remote")]
    #[command(flatten)]
    remote: crate::remote::RemoteArgs,
    #[command(flatten)]
    stdin: crate::stdin::StdinArgs,
    #[cfg(feature = "remote")]
    #[command(flatten)]
    glance: crate::glance::GlanceArgs,
    // Both required except with `-o help`, which qemu-img also runs without files;
    // hidden because clap would list optional positionals as [SRC] [DST].
    /// Input image; `-` reads a raw image from stdin (with -f raw; spooled to $TMPDIR unless --size).
    #[arg(value_name = "SRC", hide = true)]
    src: Option<PathBuf>,
    /// Output image; `-` writes it to stdout (every output format streams).
    #[arg(value_name = "DST", hide = true)]
    dst: Option<PathBuf>,
}

/// Where the image goes and how the report is printed, beside the library's options.
struct Plan {
    format: Format,
    src: PathBuf,
    dst: PathBuf,
    json: bool,
}

impl Plan {
    /// With DST `-`, stdout carries the image: everything else goes to stderr.
    fn to_stdout(&self) -> bool {
        self.dst.as_os_str() == "-"
    }
}

/// What the conversion wrote: its report, sparsify's (with --sparsify), and an upload's
/// own fields for `--output=json`.
struct Written {
    report: diskconv::ConvertReport,
    sparsified: Option<diskconv::SparsifyReport>,
    upload_json: Option<serde_json::Value>,
}

/// Run `convert` (or list the output format's options with `-o help`).
pub fn exec(args: ConvertArgs) -> Result<()> {
    let Some((mut opts, plan)) = lower(&args)? else {
        return Ok(());
    };
    let to_stdout = plan.to_stdout();
    if to_stdout {
        crate::stdout::refuse_terminal()?;
    }
    let tty = if to_stdout {
        std::io::stderr().is_terminal()
    } else {
        std::io::stdout().is_terminal()
    };
    let reporter = crate::progress::reporter(tty, to_stdout);
    let progress = args.progress && !args.quiet;
    if progress {
        opts.progress = Some(reporter.as_ref());
    }
    crate::signals::remove_temp_on_interrupt(&plan.dst);
    if args.sparsify && remote_dst(&plan.dst) {
        return Err(Error::arg(
            "--sparsify cannot write to object storage yet: sparsify to '-' and pipe it, or to a file first",
        ));
    }
    let written = write(&args, &plan, &opts);
    if progress && !tty {
        side_println(to_stdout, "");
    }
    print_report(&args, &plan, written?);
    Ok(())
}

/// The flags as [`ConvertOptions`], checked in qemu-img's order; `None` once `-o help` has
/// been printed.
fn lower(a: &ConvertArgs) -> Result<Option<(ConvertOptions<'static>, Plan)>> {
    let format = Format::from_name(&a.out_format)?;
    let mut create = CreateOptions {
        compress: a.compress,
        ..Default::default()
    };
    for o in &a.options {
        create.parse_option_string(o)?;
    }
    // qemu-img checks -S and -r while parsing flags, before `-o help`.
    let min_sparse = sparse_size_arg(&a.sparse_size)?;
    let rate_limit = a
        .rate
        .as_deref()
        .map(|r| cvtnum("rate limit", r))
        .transpose()?;
    if crate::option_help::asked(&create) {
        crate::option_help::print(format);
        return Ok(None);
    }
    check_cache_mode(&a.src_cache, "source cache option")?;
    let json = crate::flags::output_is_json(&a.output)?;
    let (Some(src), Some(dst)) = (a.src.clone(), a.dst.clone()) else {
        return Err(Error::arg(
            "convert needs SRC and DST (diskconv convert --help)",
        ));
    };
    crate::stdin::check(&src, &a.stdin)?;
    if a.target_is_zero && !a.existing_target {
        // qemu-img's words for its flags; the library names its own options.
        return Err(Error::arg("--target-is-zero requires use of -n flag"));
    }
    let mut opts = ConvertOptions::new(format);
    opts.open = crate::flags::open_options(a.src_format.as_deref(), a.allow_references)?;
    if let Some(n) = a.disk {
        opts.open = opts.open.option("disk", &n.to_string());
    }
    if let Some(sn) = &a.snapshot {
        let (k, v) = snapshot_option(sn);
        opts.open = opts.open.option(k, v);
    }
    opts.create = create;
    opts.min_sparse = min_sparse;
    opts.threads = a.threads;
    opts.existing_target = a.existing_target;
    opts.target_is_zero = a.target_is_zero;
    opts.salvage = a.salvage;
    opts.target_size = a
        .target_size
        .as_deref()
        .map(|t| cvtnum("target size", t))
        .transpose()?;
    opts.shrink = a.shrink;
    opts.rate_limit = rate_limit.unwrap_or(0);
    check_cache_mode(&a.cache, "cache option")?;
    opts.sync = a.cache != "unsafe";
    if let Some(d) = &a.digest {
        opts.digests = diskconv::DigestAlgo::parse_list(d)?;
    }
    Ok(Some((
        opts,
        Plan {
            format,
            src,
            dst,
            json,
        },
    )))
}

/// The cache modes qemu-img knows (`-t`, `-T`); anything else is its "Invalid ..." error.
fn check_cache_mode(mode: &str, what: &str) -> Result<()> {
    match mode {
        "unsafe" | "writeback" | "none" | "off" | "writethrough" | "directsync" => Ok(()),
        other => Err(Error::arg(format!("Invalid {what}: {other}"))),
    }
}

/// `-l`'s value as an open option: `snapshot.id=ID`, `snapshot.name=NAME`, or a bare
/// ID-or-name (qemu-img's `-s`).
fn snapshot_option(v: &str) -> (&str, &str) {
    match v.split_once('=') {
        Some((k @ ("snapshot.id" | "snapshot.name"), val)) => (k, val),
        _ => ("snapshot", v),
    }
}

/// Whether DST is object storage (s3://, swift://, glance://) rather than a path.
#[cfg(feature = "remote")]
fn remote_dst(dst: &Path) -> bool {
    crate::remote::is_remote(dst) || crate::glance::is_glance(dst)
}

/// Without object storage every DST is a path.
#[cfg(not(feature = "remote"))]
fn remote_dst(_dst: &Path) -> bool {
    false
}

/// Convert into DST: object storage, from standard input, through `--sparsify`, onto
/// stdout (`-`), or into a file.
fn write(a: &ConvertArgs, plan: &Plan, opts: &ConvertOptions) -> Result<Written> {
    let (src, dst) = (plan.src.as_path(), plan.dst.as_path());
    let written = |report| Written {
        report,
        sparsified: None,
        upload_json: None,
    };
    #[cfg(feature = "remote")]
    if remote_dst(dst) {
        let json = plan.json;
        let (report, upload_json) =
            match (crate::stdin::is_stdin(src), crate::glance::is_glance(dst)) {
                (true, _) => crate::stdin::convert_remote(dst, &a.stdin, &a.remote, opts, json),
                (false, true) => crate::glance::convert(src, dst, &a.glance, opts, json),
                (false, false) => crate::remote::convert(src, dst, &a.remote, opts, json),
            }?;
        return Ok(Written {
            report,
            sparsified: None,
            upload_json,
        });
    }
    if crate::stdin::is_stdin(src) {
        crate::stdin::convert(dst, &a.stdin, opts, a.sparsify).map(written)
    } else if a.sparsify {
        super::sparsify::copy(src, dst, opts).map(|r| Written {
            report: r.convert.clone().unwrap_or_default(),
            sparsified: Some(r),
            upload_json: None,
        })
    } else if plan.to_stdout() {
        convert_to_stdout(src, opts).map(written)
    } else {
        diskconv::convert(src, dst, opts).map(written)
    }
}

/// `convert SRC -`: the image on stdout, written in order through the library's stream
/// API; bad options are refused before any data is read or written.
fn convert_to_stdout(src: &Path, opts: &ConvertOptions) -> Result<diskconv::ConvertReport> {
    let dev = diskconv::open(src, &opts.open)?;
    diskconv::convert_to_writer(dev.as_ref(), crate::stdout::file()?, opts)
}

/// What `convert` prints once written: the unreadable ranges, notes, sparsify's report,
/// and with `--output=json` the JSON object (on stderr when stdout carries the image).
fn print_report(a: &ConvertArgs, plan: &Plan, w: Written) {
    let report = &w.report;
    // Printed even with -q (where qemu-img hides its --salvage warnings): they say
    // which guest bytes were lost, and a quiet script still needs to know.
    for u in &report.unreadable {
        eprintln!(
            "diskconv: warning: could not read {} bytes at offset {} ({:#x}); wrote zeros: {}",
            u.len, u.offset, u.offset, u.error
        );
    }
    if !a.quiet {
        for w in &report.warnings {
            eprintln!("diskconv: note: {w}");
        }
    }
    if let (Some(r), false, false) = (&w.sparsified, plan.json, a.quiet) {
        eprint!("{}", super::sparsify::human(r));
    }
    if plan.json {
        let to_stdout = plan.to_stdout();
        let file = (!to_stdout).then_some(plan.dst.as_path());
        let mut v = convert_json(plan.format, file, report);
        if let Some(r) = &w.sparsified {
            v["sparsify"] = crate::json::kebab_json(r);
        }
        if let (Some(o), Some(serde_json::Value::Object(u))) = (v.as_object_mut(), w.upload_json) {
            o.extend(u);
        }
        let text = serde_json::to_string_pretty(&v).expect("json");
        side_println(to_stdout, &text);
    }
}

/// What `convert --output=json` prints: what an image registry stores.
fn convert_json(
    format: Format,
    file: Option<&Path>,
    r: &diskconv::ConvertReport,
) -> serde_json::Value {
    let digests: serde_json::Map<String, serde_json::Value> = r
        .digests
        .iter()
        .map(|(a, h)| (a.name().to_string(), serde_json::Value::from(h.as_str())))
        .collect();
    let mut v = serde_json::json!({
        "format": format.name(),
        "virtual-size": r.virtual_size,
        "size": r.size,
        "digests": digests,
    });
    if let Some(n) = r.output_len {
        v["expected-size"] = n.into();
    }
    if let Some(f) = file {
        v["filename"] = f.display().to_string().into();
    }
    v
}
