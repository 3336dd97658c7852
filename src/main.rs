//! The `diskconv` command: qemu-img-compatible flags over the diskconv library.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
mod cli_check;
mod cli_cmms;
#[cfg(feature = "remote")]
mod cli_glance;
#[cfg(feature = "remote")]
mod cli_remote;
mod cli_stdin;
#[cfg(feature = "remote")]
mod cli_swift;
use diskconv::parse_size;
use diskconv::{
    ConvertOptions, CreateOptions, Error, Format, ImageInfo, OpenOptions, Preallocation,
    ResizeOptions, Result,
};

/// qemu-img's names, listed in `--help` so users need not guess (`vhd` is accepted for `vpc`).
const FORMATS_HELP: &str =
    "Supported formats: raw qcow2 vpc (alias vhd) vmdk vdi vhdx ova; read only: qcow qed";

/// `convert --help`'s description of its two files, which clap cannot list as required.
const CONVERT_ARGS_HELP: &str = concat!(
    "Arguments:\n  SRC  Input image; `-`: a raw image on stdin (-f raw), spooled first to a deleted file in\n       $TMPDIR holding its non-zero 64 KiB blocks (up to its length), or read once with --size\n  DST  Output image\n\n",
    "Supported formats: raw qcow2 vpc (alias vhd) vmdk vdi vhdx ova; read only: qcow qed"
);

#[derive(Parser)]
#[command(
    name = "diskconv",
    version,
    about = "Convert and inspect disk images (raw, qcow2, vpc/vhd, vmdk, vdi, vhdx, ova; qcow and qed read only)",
    after_help = FORMATS_HELP
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

// Parsed once per process: the size of the largest variant costs nothing worth boxing for.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Cmd {
    /// Check an image's metadata like qemu-img check (exit 0 clean, 1 not completed,
    /// 2 corruptions, 3 leaks only, 63 no checks for the format); -r repairs in place.
    #[command(
        override_usage = "diskconv check [-f FMT] [--output=human|json] [-r leaks|all] [-q] [--allow-references] IMG",
        args_override_self = true
    )]
    Check(cli_check::CheckArgs),
    /// Convert SRC into a new image DST of format -O.
    #[command(
        override_usage = "diskconv convert [OPTIONS] SRC DST\n       diskconv convert -O FMT -o help",
        after_help = CONVERT_ARGS_HELP,
        args_override_self = true
    )]
    Convert {
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
        remote: cli_remote::RemoteArgs,
        #[command(flatten)]
        stdin: cli_stdin::StdinArgs,
        #[cfg(feature = "remote")]
        #[command(flatten)]
        glance: cli_glance::GlanceArgs,
        // Both required except with `-o help`, which qemu-img also runs without files;
        // hidden because clap would list optional positionals as [SRC] [DST].
        /// Input image; `-` reads a raw image from stdin (with -f raw; spooled to $TMPDIR unless --size).
        #[arg(value_name = "SRC", hide = true)]
        src: Option<PathBuf>,
        /// Output image; `-` writes it to stdout (every output format streams).
        #[arg(value_name = "DST", hide = true)]
        dst: Option<PathBuf>,
    },
    /// Create an empty image FILE of SIZE bytes (suffixes k, M, G, T, ...), like qemu-img create.
    #[command(
        override_usage = "diskconv create [-f FMT] [-o OPTIONS] [-q] FILE SIZE",
        after_help = FORMATS_HELP,
        args_override_self = true
    )]
    Create {
        /// Image format.
        #[arg(short = 'f', default_value = "raw")]
        format: String,
        /// Format options, key=value[,key=value...]; `-o help` lists them.
        #[arg(short = 'o')]
        options: Vec<String>,
        /// Quiet: do not print the "Formatting" line.
        #[arg(short = 'q')]
        quiet: bool,
        /// Image to create (replaced if it exists).
        #[arg(value_name = "FILE")]
        file: Option<PathBuf>,
        /// Guest size (suffixes k, M, G, T, ...).
        #[arg(value_name = "SIZE")]
        size: Option<String>,
    },
    /// Change an image's virtual size in place, like qemu-img resize: SIZE is absolute or
    /// +SIZE/-SIZE relative (suffixes k, M, G, T, ...). Shrinking needs --shrink.
    #[command(
        override_usage = "diskconv resize [-f FMT] [--shrink] [--preallocation=off|full] [-q] IMG [+ | -]SIZE",
        args_override_self = true
    )]
    Resize {
        /// Image format (never probed when given).
        #[arg(short = 'f')]
        format: Option<String>,
        /// Allow a size below the current one: data past it is lost.
        #[arg(long = "shrink")]
        shrink: bool,
        /// off (new space unallocated) or full (new space written with zeros).
        #[arg(long = "preallocation", default_value = "off")]
        preallocation: String,
        /// Quiet: do not print "Image resized.".
        #[arg(short = 'q')]
        quiet: bool,
        /// Image.
        image: PathBuf,
        /// New size: SIZE, +SIZE or -SIZE.
        #[arg(allow_hyphen_values = true)]
        size: String,
    },
    /// Copy IN into OUT dropping the blocks its guest's filesystems mark free (deleted
    /// files' leftovers), read from the partition table and each filesystem's own maps;
    /// with --in-place, give them back inside IMG itself. Partitions that do not validate
    /// are left untouched and reported.
    #[command(
        override_usage = "diskconv sparsify [-f FMT] [-O FMT] [-o OPTIONS] [-c] [-S SIZE] [--output=human|json] [-q] IN OUT\n       diskconv sparsify --in-place [-f FMT] [--output=human|json] [-q] IMG",
        args_override_self = true
    )]
    Sparsify {
        /// Input format (never probed when given).
        #[arg(short = 'f')]
        src_format: Option<String>,
        /// Output format (default: the input's).
        #[arg(short = 'O')]
        out_format: Option<String>,
        /// Output options, key=value[,key=value...], as for convert.
        #[arg(short = 'o')]
        options: Vec<String>,
        /// Compress the output (qcow2, streamOptimized vmdk).
        #[arg(short = 'c')]
        compress: bool,
        /// Zero runs of at least SIZE inside data stay unallocated too (default 4k).
        #[arg(short = 'S', default_value = "4k", allow_hyphen_values = true)]
        sparse_size: String,
        /// Sparsify IMG itself instead of writing a copy.
        #[arg(long = "in-place")]
        in_place: bool,
        /// human (one line per partition), or json.
        #[arg(long = "output", default_value = "human")]
        output: String,
        /// Quiet: no report (errors are still printed).
        #[arg(short = 'q')]
        quiet: bool,
        /// Worker threads (0: one per core).
        #[arg(short = 'm', long = "threads", default_value_t = 0)]
        threads: usize,
        /// Allow opening files named inside the input image, confined to its folder.
        #[arg(long = "allow-references", alias = "allow-backing")]
        allow_references: bool,
        /// Input image (with --in-place: the image to change).
        #[arg(value_name = "IN")]
        src: PathBuf,
        /// Output image; `-` writes it to stdout (formats that stream only).
        #[arg(value_name = "OUT")]
        dst: Option<PathBuf>,
    },
    /// Compare the guest contents of two images (exit 0 identical, 1 different, 2+ error).
    Compare(cli_cmms::CompareArgs),
    /// Show where an image's guest ranges are allocated, like qemu-img map.
    Map(cli_cmms::MapArgs),
    /// List an image's internal snapshots (qcow2), like qemu-img snapshot -l.
    Snapshot(cli_cmms::SnapshotArgs),
    /// How many bytes an output of format -O (default raw) would take, like qemu-img measure.
    Measure(cli_cmms::MeasureArgs),
    /// Show facts about an image.
    #[command(args_override_self = true)]
    Info {
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
    },
    /// Check an uploaded image before accepting it: detected format vs the claim, and
    /// every safety finding. Never opens files the image names. Exit status 0 only for a
    /// safe image of the claimed format, 2 for an unsafe one, 1 on errors.
    Inspect {
        /// The format the image is claimed to be.
        #[arg(short = 'f', long = "format")]
        format: Option<String>,
        /// human or json.
        #[arg(long = "output", default_value = "human")]
        output: String,
        /// With an OVA: which of its disks to inspect (1-based; default the first).
        #[arg(long = "disk", value_name = "N")]
        disk: Option<usize>,
        /// Image.
        image: PathBuf,
    },
    /// Register a Glance image whose data is already stored at --location (s3://, swift://,
    /// rbd://, http(s)://), with the digests and virtual size of a local copy or of flags.
    #[cfg(feature = "remote")]
    Register(cli_glance::RegisterArgs),
    /// Abort the multipart uploads left open under s3://BUCKET/PREFIX, or delete the
    /// segments no manifest uses under swift://CONTAINER/PREFIX (what a killed `convert`
    /// leaves: no object, but stored parts); prints what it removed.
    #[cfg(feature = "remote")]
    AbortUploads {
        /// s3://BUCKET/KEY-PREFIX or swift://CONTAINER/OBJECT-PREFIX
        url: String,
    },
}

fn main() -> ExitCode {
    // Usage errors exit 1 like qemu-img's, not clap's 2; --help and --version exit 0.
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 1 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        // Failed because a signal's cleanup aborted it (an upload): the cleanup thread
        // ends the process by that signal; exiting 1 first would hide it.
        Err(_) if SIGNALLED.load(std::sync::atomic::Ordering::SeqCst) => loop {
            std::thread::park();
        },
        Err(e) => {
            eprintln!("diskconv: {}", cli_message(&e));
            ExitCode::FAILURE
        }
    }
}

/// The library's option names (`Type::field`, which its messages use) spelled as this
/// command line's flags, longest first so no name is a prefix of a later one.
const FLAGS: &[(&str, &str)] = &[
    ("ConvertOptions::existing_target", "-n"),
    ("ConvertOptions::target_is_zero", "--target-is-zero"),
    ("OpenOptions::allow_references", "--allow-references"),
    (
        "ConvertOptions::target_size",
        "diskconv convert --target-size SIZE",
    ),
    ("ConvertOptions::shrink", "--shrink"),
    ("ResizeOptions::shrink", "--shrink"),
];

/// An error as the command line says it: in one line, with its flags where the library
/// names its options ("set ConvertOptions::shrink" reads "set --shrink").
fn cli_message(e: &Error) -> String {
    let mut msg = e.to_string();
    for (opt, flag) in FLAGS {
        msg = msg.replace(opt, flag);
    }
    msg
}

/// A library report as the command line's JSON: qemu's key style, kebab-case
/// (`virtual-size`, `free-bytes`), as `info`, `measure`, `check` and `map` print theirs; the
/// library's own serde names (snake_case) stay as they are for Rust users.
fn kebab_json(report: &impl serde::Serialize) -> serde_json::Value {
    fn kebab(v: serde_json::Value) -> serde_json::Value {
        match v {
            serde_json::Value::Object(m) => serde_json::Value::Object(
                m.into_iter()
                    .map(|(k, v)| (k.replace('_', "-"), kebab(v)))
                    .collect(),
            ),
            serde_json::Value::Array(a) => {
                serde_json::Value::Array(a.into_iter().map(kebab).collect())
            }
            other => other,
        }
    }
    kebab(serde_json::to_value(report).expect("a report serializes"))
}

fn open_options(format: Option<&str>, allow: bool) -> Result<OpenOptions> {
    let mut o = OpenOptions::new().allow_references(allow, None);
    if let Some(f) = format {
        o = o.format(Format::from_name(f)?);
    }
    Ok(o)
}

/// qemu-img's `cvtnum`: a size with an optional suffix, 0 up to i64::MAX, and its two
/// messages.
fn cvtnum(name: &str, arg: &str) -> Result<u64> {
    let range = || {
        Error::arg(format!(
            "Invalid {name} specified. Must be between 0 and {}.",
            i64::MAX
        ))
    };
    if let Some(rest) = arg.trim_start().strip_prefix('-') {
        return Err(if parse_size(rest).is_ok() {
            range()
        } else {
            Error::arg(format!("Invalid {name} specified: '{arg}'."))
        });
    }
    match parse_size(arg) {
        Ok(v) if v > i64::MAX as u64 => Err(range()),
        Ok(v) => Ok(v),
        Err(_) => Err(Error::arg(format!("Invalid {name} specified: '{arg}'."))),
    }
}

/// Largest `-S` qemu-img accepts: its 16 MiB copy buffer.
const MAX_SPARSE_SIZE: u64 = 32768 * 512;

/// `-S` as qemu-img checks it: a multiple of 512 up to 16 MiB, or 0.
fn sparse_size_arg(arg: &str) -> Result<u64> {
    let v = cvtnum("buffer size for sparse output", arg)?;
    if v % 512 != 0 || v > MAX_SPARSE_SIZE {
        return Err(Error::arg(format!(
            "Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 up to {MAX_SPARSE_SIZE}. Select 0 to disable sparse detection (fully allocates output)."
        )));
    }
    Ok(v)
}

/// The cache modes qemu-img knows (`-t`, `-T`); anything else is its "Invalid ..." error.
fn check_cache_mode(mode: &str, what: &str) -> Result<()> {
    match mode {
        "unsafe" | "writeback" | "none" | "off" | "writethrough" | "directsync" => Ok(()),
        other => Err(Error::arg(format!("Invalid {what}: {other}"))),
    }
}

/// qemu-img create's first line: `Formatting 'FILE', fmt=FMT` and the options in the
/// order qemu's drivers list them, with their defaults, then any other option given.
fn formatting_line(file: &Path, format: Format, opts: &CreateOptions) -> String {
    let size = opts.size.to_string();
    let order: &[(&str, Option<&str>)] = match format {
        Format::Raw => &[("size", None), ("preallocation", None)],
        Format::Qcow2 => &[
            ("cluster_size", Some("65536")),
            ("extended_l2", Some("off")),
            ("preallocation", None),
            ("compression_type", Some("zlib")),
            ("size", None),
            ("backing_file", None),
            ("backing_fmt", None),
            ("compat", None),
            ("lazy_refcounts", Some("off")),
            ("refcount_bits", Some("16")),
        ],
        Format::Vhd => &[("size", None), ("subformat", None), ("force_size", None)],
        Format::Vmdk => &[
            ("size", None),
            ("adapter_type", None),
            ("backing_file", None),
            ("compat6", Some("off")),
            ("hwversion", Some("undefined")),
            ("toolsversion", None),
            ("subformat", None),
            ("zeroed_grain", None),
        ],
        Format::Vdi => &[("size", None), ("static", Some("off"))],
        Format::Vhdx => &[
            ("size", None),
            ("log_size", Some("1048576")),
            ("block_size", Some("0")),
            ("subformat", None),
        ],
        _ => &[("size", None)],
    };
    let mut line = format!("Formatting '{}', fmt={format}", file.display());
    for (k, default) in order {
        let v = if *k == "size" {
            Some(size.clone())
        } else {
            opts.str_option(k)
                .map(|v| option_shown(format, k, v))
                .or(default.map(str::to_string))
        };
        if let Some(v) = v {
            line += &format!(" {k}={v}");
        }
    }
    for (k, v) in &opts.options {
        if !order.iter().any(|(o, _)| o == k) {
            line += &format!(" {k}={}", option_shown(format, k, v));
        }
    }
    line
}

/// An option value as qemu prints it: sizes in bytes, booleans as on/off.
fn option_shown(format: Format, key: &str, v: &str) -> String {
    let kind = format
        .create_options()
        .iter()
        .find(|o| o.name == key)
        .map(|o| o.kind);
    match kind {
        Some("size") => parse_size(v).map_or(v.to_string(), |n| n.to_string()),
        Some("bool") => diskconv::parse_bool(key, v)
            .map_or(v.to_string(), |b| if b { "on" } else { "off" }.to_string()),
        _ => v.to_string(),
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Convert {
            src_format,
            out_format,
            options,
            compress,
            progress,
            quiet,
            sparse_size,
            cache,
            src_cache,
            _force_share,
            salvage,
            target_size,
            shrink,
            rate,
            threads,
            _unordered,
            allow_references,
            disk,
            snapshot,
            existing_target,
            target_is_zero,
            sparsify,
            digest,
            output,
            #[cfg(feature = "remote")]
            remote,
            stdin,
            #[cfg(feature = "remote")]
            glance,
            src,
            dst,
        } => {
            let format = Format::from_name(&out_format)?;
            let mut create = CreateOptions {
                compress,
                ..Default::default()
            };
            for o in &options {
                create.parse_option_string(o)?;
            }
            // qemu-img checks -S and -r while parsing flags, before `-o help`.
            let min_sparse = sparse_size_arg(&sparse_size)?;
            let rate_limit = rate
                .as_deref()
                .map(|r| cvtnum("rate limit", r))
                .transpose()?;
            if create.options.contains_key("help") || create.options.contains_key("?") {
                print_option_help(format);
                return Ok(());
            }
            check_cache_mode(&src_cache, "source cache option")?;
            let json = match output.as_str() {
                "json" => true,
                "human" => false,
                other => {
                    return Err(Error::arg(format!(
                        "--output must be human or json, not '{other}'"
                    )))
                }
            };
            let (Some(src), Some(dst)) = (src, dst) else {
                return Err(Error::arg(
                    "convert needs SRC and DST (diskconv convert --help)",
                ));
            };
            cli_stdin::check(&src, &stdin)?;
            if target_is_zero && !existing_target {
                // qemu-img's words for its flags; the library names its own options.
                return Err(Error::arg("--target-is-zero requires use of -n flag"));
            }
            let mut opts = ConvertOptions::new(format);
            opts.open = open_options(src_format.as_deref(), allow_references)?;
            if let Some(n) = disk {
                opts.open = opts.open.option("disk", &n.to_string());
            }
            if let Some(sn) = &snapshot {
                let (k, v) = cli_cmms::snapshot_option(sn);
                opts.open = opts.open.option(k, v);
            }
            opts.create = create;
            opts.min_sparse = min_sparse;
            opts.threads = threads;
            opts.existing_target = existing_target;
            opts.target_is_zero = target_is_zero;
            opts.salvage = salvage;
            opts.target_size = target_size
                .as_deref()
                .map(|t| cvtnum("target size", t))
                .transpose()?;
            opts.shrink = shrink;
            opts.rate_limit = rate_limit.unwrap_or(0);
            check_cache_mode(&cache, "cache option")?;
            opts.sync = cache != "unsafe";
            if let Some(d) = &digest {
                opts.digests = diskconv::DigestAlgo::parse_list(d)?;
            }
            // With DST `-`, stdout carries the image: everything else goes to stderr.
            let to_stdout = dst.as_os_str() == "-";
            if to_stdout && std::io::stdout().is_terminal() {
                return Err(Error::arg(
                    "refusing to write a disk image to a terminal; redirect stdout or name a file",
                )
                .with_path("-"));
            }
            let tty = if to_stdout {
                std::io::stderr().is_terminal()
            } else {
                std::io::stdout().is_terminal()
            };
            let reporter: Box<dyn Fn(u64, u64) + Sync> = if tty {
                let bar = indicatif::ProgressBar::with_draw_target(
                    Some(100),
                    if to_stdout {
                        indicatif::ProgressDrawTarget::stderr()
                    } else {
                        indicatif::ProgressDrawTarget::stdout()
                    },
                );
                bar.set_style(
                    indicatif::ProgressStyle::with_template(
                        "{bar:40} {percent:>3}% {elapsed_precise}",
                    )
                    .expect("static template"),
                );
                Box::new(move |done: u64, total: u64| {
                    bar.set_position(done.saturating_mul(100).checked_div(total).unwrap_or(100))
                })
            } else {
                // Like qemu-img: a new line of figures only after another 1% or at the end.
                let last = std::sync::atomic::AtomicU64::new(u64::MAX);
                Box::new(move |done: u64, total: u64| {
                    let hundredths = done
                        .saturating_mul(10_000)
                        .checked_div(total)
                        .unwrap_or(10_000);
                    let prev = last.load(std::sync::atomic::Ordering::Relaxed);
                    if prev == u64::MAX
                        || hundredths >= prev + 100
                        || (done == total && hundredths != prev)
                    {
                        last.store(hundredths, std::sync::atomic::Ordering::Relaxed);
                        print_progress(done, total, to_stdout);
                    }
                })
            };
            let progress = progress && !quiet;
            if progress {
                opts.progress = Some(reporter.as_ref());
            }
            remove_temp_on_interrupt(&dst);
            let mut sparsified = None;
            // An s3:// DST: the upload's own fields join --output=json's.
            let mut upload_json = None;
            #[cfg(feature = "remote")]
            let remote_dst = cli_remote::is_remote(&dst) || cli_glance::is_glance(&dst);
            #[cfg(not(feature = "remote"))]
            let remote_dst = false;
            if sparsify && remote_dst {
                return Err(diskconv::Error::arg(
                    "--sparsify cannot write to object storage yet: sparsify to '-' and pipe it, or to a file first",
                ));
            }
            #[cfg(feature = "remote")]
            let remote_report = remote_dst.then(|| {
                match (cli_stdin::is_stdin(&src), cli_glance::is_glance(&dst)) {
                    (true, _) => cli_stdin::convert_remote(&dst, &stdin, &remote, &opts, json),
                    (false, true) => cli_glance::convert(&src, &dst, &glance, &opts, json),
                    (false, false) => cli_remote::convert(&src, &dst, &remote, &opts, json),
                }
            });
            #[cfg(not(feature = "remote"))]
            let remote_report: Option<Result<(diskconv::ConvertReport, _)>> = None;
            let report = if cli_stdin::is_stdin(&src) && !remote_dst {
                cli_stdin::convert(&dst, &stdin, &opts, sparsify)
            } else if sparsify {
                sparsify_copy(&src, &dst, &opts).map(|r| {
                    let c = r.convert.clone().unwrap_or_default();
                    sparsified = Some(r);
                    c
                })
            } else if to_stdout {
                convert_to_stdout(&src, &opts)
            } else if let Some(r) = remote_report {
                r.map(|(r, j)| {
                    upload_json = j;
                    r
                })
            } else {
                diskconv::convert(&src, &dst, &opts)
            };
            if progress && !tty {
                side_println(to_stdout, "");
            }
            let report = report?;
            // Printed even with -q (where qemu-img hides its --salvage warnings): they say
            // which guest bytes were lost, and a quiet script still needs to know.
            for u in &report.unreadable {
                eprintln!(
                    "diskconv: warning: could not read {} bytes at offset {} ({:#x}); wrote zeros: {}",
                    u.len, u.offset, u.offset, u.error
                );
            }
            if !quiet {
                for w in &report.warnings {
                    eprintln!("diskconv: note: {w}");
                }
            }
            if let (Some(r), false, false) = (&sparsified, json, quiet) {
                eprint!("{}", sparsify_human(r));
            }
            if json {
                let mut v = convert_json(format, (!to_stdout).then_some(dst.as_path()), &report);
                if let Some(r) = &sparsified {
                    v["sparsify"] = kebab_json(r);
                }
                if let (Some(o), Some(serde_json::Value::Object(u))) =
                    (v.as_object_mut(), upload_json)
                {
                    o.extend(u);
                }
                let text = serde_json::to_string_pretty(&v).expect("json");
                side_println(to_stdout, &text);
            }
            Ok(())
        }
        Cmd::Create {
            format,
            options,
            quiet,
            file,
            size,
        } => {
            let format = Format::from_name(&format)?;
            let mut create = CreateOptions::default();
            for o in &options {
                create.parse_option_string(o)?;
            }
            if create.options.contains_key("help") || create.options.contains_key("?") {
                print_option_help(format);
                return Ok(());
            }
            let file = file.ok_or_else(|| Error::arg("Expecting image file name"))?;
            let size = size.ok_or_else(|| {
                Error::arg("Image creation needs a size parameter").with_path(&file)
            })?;
            create.size = cvtnum("image size", &size)?;
            diskconv::formats::check_writable(format).map_err(|e| e.with_path(&file))?;
            if !quiet {
                println!("{}", formatting_line(&file, format, &create));
            }
            for w in diskconv::create(&file, format, &create)? {
                if !quiet {
                    eprintln!("diskconv: note: {w}");
                }
            }
            Ok(())
        }
        Cmd::Check(args) => cli_check::run(args),
        Cmd::Resize {
            format,
            shrink,
            preallocation,
            quiet,
            image,
            size,
        } => {
            let format = format.as_deref().map(Format::from_name).transpose()?;
            let preallocation = match preallocation.as_str() {
                "off" => Preallocation::Off,
                "full" => Preallocation::Full,
                other => {
                    return Err(Error::arg(format!(
                        "Invalid preallocation mode: '{other}' (diskconv resize takes off or full)"
                    )))
                }
            };
            let new_size = resize_target(&image, format, &size)?;
            let opts = ResizeOptions {
                format,
                shrink,
                preallocation,
                ..Default::default()
            };
            if let Err(e) = diskconv::resize(&image, new_size, &opts) {
                if !shrink && e.option() == Some("ResizeOptions::shrink") {
                    // qemu-img's words, in its order: the refusal, then why it matters.
                    eprintln!("diskconv: Use the --shrink option to perform a shrink operation.");
                    eprintln!("diskconv: warning: Shrinking an image will delete all data beyond the shrunken image's end. Before performing such an operation, make sure there is no important data there.");
                    std::process::exit(1);
                }
                return Err(e);
            }
            if !quiet {
                println!("Image resized.");
            }
            Ok(())
        }
        Cmd::Sparsify {
            src_format,
            out_format,
            options,
            compress,
            sparse_size,
            in_place,
            output,
            quiet,
            threads,
            allow_references,
            src,
            dst,
        } => {
            let json = match output.as_str() {
                "json" => true,
                "human" => false,
                other => {
                    return Err(Error::arg(format!(
                        "--output must be human or json, not '{other}'"
                    )))
                }
            };
            let open = open_options(src_format.as_deref(), allow_references)?;
            let (report, to_stderr) = if in_place {
                if dst.is_some() || out_format.is_some() || !options.is_empty() || compress {
                    return Err(Error::arg(
                        "sparsify --in-place takes one image and no -O, -o, -c or OUT",
                    ));
                }
                let mut opts = diskconv::SparsifyOptions::new(Format::Raw);
                opts.convert.open = open;
                (diskconv::sparsify_in_place(&src, &opts)?, false)
            } else {
                let dst = dst.ok_or_else(|| {
                    Error::arg(
                        "sparsify needs IN and OUT, or --in-place IMG (diskconv sparsify --help)",
                    )
                })?;
                let format = match &out_format {
                    Some(f) => Format::from_name(f)?,
                    None => match open.format {
                        Some(f) => f,
                        None => diskconv::probe(&src)?,
                    },
                };
                let mut create = CreateOptions {
                    compress,
                    ..Default::default()
                };
                for o in &options {
                    create.parse_option_string(o)?;
                }
                let mut opts = ConvertOptions::new(format);
                opts.open = open;
                opts.create = create;
                opts.min_sparse = sparse_size_arg(&sparse_size)?;
                opts.threads = threads;
                let to_stdout = dst.as_os_str() == "-";
                if to_stdout && std::io::stdout().is_terminal() {
                    return Err(Error::arg(
                        "refusing to write a disk image to a terminal; redirect stdout or name a file",
                    )
                    .with_path("-"));
                }
                remove_temp_on_interrupt(&dst);
                (sparsify_copy(&src, &dst, &opts)?, to_stdout)
            };
            if json {
                let text = serde_json::to_string_pretty(&kebab_json(&report)).expect("json");
                side_println(to_stderr, &text);
            } else if !quiet {
                let text = sparsify_human(&report);
                side_println(to_stderr, text.trim_end());
            }
            Ok(())
        }
        Cmd::Compare(a) => std::process::exit(cli_cmms::compare(&a)),
        Cmd::Map(a) => cli_cmms::map(&a),
        Cmd::Snapshot(a) => cli_cmms::snapshot(&a),
        Cmd::Measure(a) => cli_cmms::measure(&a),
        Cmd::Info {
            format,
            output,
            allow_references,
            _force_share,
            disk,
            image,
        } => {
            // Like qemu-img info: backing and parent images are named, never opened.
            let mut opts = open_options(format.as_deref(), allow_references)?.without_backing();
            if let Some(n) = disk {
                opts = opts.option("disk", &n.to_string());
            }
            let dev = diskconv::open(&image, &opts)?;
            let info = dev.info();
            match output.as_str() {
                "json" => {
                    let mut v = info_json(&image, &info);
                    // A container qemu does not know: the disk's keys, plus its own object.
                    if let Some((k, c)) = dev.container_info() {
                        v[k] = c;
                    }
                    println!("{}", serde_json::to_string_pretty(&v).expect("json"))
                }
                "human" => print!("{}", info_human(&image, &info)),
                other => {
                    return Err(Error::arg(format!(
                        "--output must be human or json, not '{other}'"
                    )))
                }
            }
            Ok(())
        }
        Cmd::Inspect {
            format,
            output,
            disk,
            image,
        } => {
            let claim = format.as_deref().map(Format::from_name).transpose()?;
            let limits = diskconv::InspectLimits {
                ova_disk: disk,
                ..Default::default()
            };
            let insp = diskconv::inspect_with(&image, claim, &limits)?;
            match output.as_str() {
                "json" => println!(
                    "{}",
                    serde_json::to_string_pretty(&kebab_json(&insp)).expect("json")
                ),
                "human" => print!("{}", inspection_human(&insp)),
                other => {
                    return Err(Error::arg(format!(
                        "--output must be human or json, not '{other}'"
                    )))
                }
            }
            if !insp.safe {
                use std::io::Write;
                let _ = std::io::stdout().flush();
                std::process::exit(2);
            }
            Ok(())
        }
        #[cfg(feature = "remote")]
        Cmd::AbortUploads { url } => cli_remote::abort_uploads(&url),
        #[cfg(feature = "remote")]
        Cmd::Register(a) => cli_glance::register(&a),
    }
}

/// An interrupted conversion must leave nothing behind: on SIGINT/SIGTERM/SIGHUP remove
/// this process's temporary output files (wherever a symlinked DST put them), then die of
/// the same signal, as qemu-img does (it has no handler), so a parent sees the signal (a
/// shell reports 130 for SIGINT, 143 for SIGTERM).
/// A stream (stdout, a FIFO, a character device) has nothing to remove: its reader is
/// told the image it got is incomplete.
fn remove_temp_on_interrupt(dst: &Path) {
    use std::os::unix::fs::FileTypeExt;
    let stream = dst == Path::new("-")
        || std::fs::metadata(dst).is_ok_and(|m| {
            let t = m.file_type();
            t.is_fifo() || t.is_char_device()
        });
    let shown = dst.display().to_string();
    on_termination_signal(move || {
        #[cfg(feature = "remote")]
        diskconv::remote::abort_uploads();
        #[cfg(feature = "remote")]
        diskconv::remote::abort_glance_uploads();
        diskconv::writer::remove_temporaries();
        if stream {
            eprintln!("\ndiskconv: interrupted; the image sent to {shown} is incomplete");
        } else {
            eprintln!("\ndiskconv: interrupted; partial output removed");
        }
    });
}

/// Write end of the pipe the signal handler reports on (-1 until installed).
static SIGNAL_PIPE: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

/// Set by the signal handler: the process is being terminated by a signal.
static SIGNALLED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn note_signal(sig: libc::c_int) {
    SIGNALLED.store(true, std::sync::atomic::Ordering::SeqCst);
    // Only async-signal-safe work here: one write(2); the thread below does the rest.
    let fd = SIGNAL_PIPE.load(std::sync::atomic::Ordering::Relaxed);
    let b = sig as u8;
    // SAFETY: writing one byte from a valid local to a pipe fd we own.
    unsafe { libc::write(fd, (&b as *const u8).cast(), 1) };
}

/// Run `cleanup` on a thread when SIGINT, SIGTERM or SIGHUP arrives, then terminate the
/// process by that signal (default action restored and the signal raised again).
fn on_termination_signal(cleanup: impl FnOnce() + Send + 'static) {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: pipe(2) fills the two-element array.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        return;
    }
    SIGNAL_PIPE.store(fds[1], std::sync::atomic::Ordering::Relaxed);
    let signals = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];
    for sig in signals {
        // SAFETY: installing a handler that only calls write(2).
        unsafe { libc::signal(sig, note_signal as *const () as libc::sighandler_t) };
    }
    std::thread::spawn(move || {
        let mut b = [0u8; 1];
        // SAFETY: reading one byte into a valid buffer from the pipe's read end.
        let n = unsafe { libc::read(fds[0], b.as_mut_ptr().cast(), 1) };
        if n != 1 {
            return;
        }
        let sig = libc::c_int::from(b[0]);
        cleanup();
        // SAFETY: restoring the default action and raising the signal ends the process.
        unsafe {
            libc::signal(sig, libc::SIG_DFL);
            libc::raise(sig);
        }
        std::process::exit(128 + sig);
    });
}

fn inspection_human(i: &diskconv::Inspection) -> String {
    let fmt = |f: Option<Format>| f.map(|f| f.name().to_string());
    let mut s = format!("image: {}\nfile size: {}\n", i.path, i.file_size);
    s += &format!(
        "claimed format: {}\n",
        fmt(i.claimed_format).unwrap_or_else(|| "(none)".into())
    );
    let detected = fmt(i.detected_format).unwrap_or_else(|| match &i.unsupported_format {
        Some(name) => format!("{name} (not supported)"),
        None => format!("ambiguous ({})", i.claiming_formats.join(", ")),
    });
    s += &format!("detected format: {detected}\n");
    if let Some(v) = i.virtual_size {
        s += &format!("virtual size: {} ({v} bytes)\n", human_size(v));
    }
    if let Some(m) = &i.map {
        s += &format!(
            "map: {} calls, {}; data {} B, zero {} B, unallocated {} B\n",
            m.calls,
            if m.complete { "complete" } else { "incomplete" },
            m.data_bytes,
            m.zero_bytes,
            m.unallocated_bytes
        );
    }
    s += &format!("verdict: {}\n", if i.safe { "safe" } else { "UNSAFE" });
    for f in &i.findings {
        let class = if f.hazard { "unsafe" } else { "info" };
        s += &format!("[{class}] {:?}: {}\n", f.kind, f.detail);
    }
    s
}

/// qemu-img's non-terminal progress line on stdout (stderr when stdout carries the image),
/// rewritten in place.
fn print_progress(done: u64, total: u64, to_stderr: bool) {
    use std::io::Write;
    let pct = if total == 0 {
        100.0
    } else {
        done as f64 * 100.0 / total as f64
    };
    let line = format!("    ({pct:.2}/100%)\r");
    if to_stderr {
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    } else {
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(line.as_bytes());
        let _ = out.flush();
    }
}

/// A line on stdout, or on stderr when stdout carries the image.
fn side_println(to_stderr: bool, s: &str) {
    if to_stderr {
        eprintln!("{s}");
    } else {
        println!("{s}");
    }
}

/// `convert SRC -`: the image on stdout, written in order through the library's stream
/// API; bad options are refused before any data is read or written.
fn convert_to_stdout(src: &Path, opts: &ConvertOptions) -> Result<diskconv::ConvertReport> {
    use std::os::fd::AsFd;
    let dev = diskconv::open(src, &opts.open)?;
    // A descriptor of its own: unbuffered, whole runs per write(2), not std's line buffer.
    let out = std::io::stdout()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| Error::io("cannot use stdout", e).with_path("-"))?;
    diskconv::convert_to_writer(dev.as_ref(), std::fs::File::from(out), opts)
}

/// `sparsify` (and `convert --sparsify`) into DST, or into stdout when DST is `-`.
fn sparsify_copy(
    src: &Path,
    dst: &Path,
    opts: &ConvertOptions,
) -> Result<diskconv::SparsifyReport> {
    let sopts = diskconv::SparsifyOptions {
        convert: opts.clone(),
    };
    if dst.as_os_str() != "-" {
        return diskconv::sparsify(src, dst, &sopts);
    }
    use std::os::fd::AsFd;
    let out = std::io::stdout()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| Error::io("cannot use stdout", e).with_path("-"))?;
    diskconv::sparsify_to_writer(src, std::fs::File::from(out), &sopts)
}

/// The sparsify report for people: one line per partition, then the totals.
fn sparsify_human(r: &diskconv::SparsifyReport) -> String {
    let mut s = String::new();
    for n in &r.notes {
        s += &format!("note: {n}\n");
    }
    for p in &r.partitions {
        let fs = p.filesystem.as_deref().unwrap_or("-");
        let what = match &p.skipped {
            Some(why) => format!("skipped: {why}"),
            None => format!("{} free, dropped", human_size(p.free_bytes)),
        };
        s += &format!(
            "{:<12} offset {:>12}  size {:>10}  {:<11} {what}\n",
            p.location,
            p.offset,
            human_size(p.size),
            fs
        );
    }
    s += &format!(
        "partition table: {}; dropped {} ({} bytes) of {}; output {} ({} bytes)",
        r.table,
        human_size(r.dropped_bytes),
        r.dropped_bytes,
        human_size(r.virtual_size),
        human_size(r.output_size),
        r.output_size
    );
    if let Some(b) = r.size_before {
        s += &format!(", was {} ({b} bytes)", human_size(b));
    }
    s.push('\n');
    s
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

/// `-o help` in qemu-img's layout: `  name=<type>` padded to 22 columns, ` - `, the help.
fn print_option_help(format: Format) {
    println!("Supported {format} options:");
    for o in format.create_options() {
        let kind = match o.kind {
            "string" => "str",
            "number" => "num",
            "bool" => "bool (on/off)",
            k => k,
        };
        let left = format!("{}=<{kind}>", o.name);
        println!("  {left:<22} - {}", o.help);
    }
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
    if let Some(object) = cli_remote::host_object(path) {
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

/// Sizes the way qemu-img prints them: "1 GiB", "2.44 GiB", "512 B".
fn human_size(n: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < UNITS.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    let s = if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    };
    let s = if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    };
    format!("{s} {}", UNITS[i])
}

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
        human_value(&mut s, &data, 1);
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

fn human_value(out: &mut String, v: &serde_json::Value, depth: usize) {
    let pad = "    ".repeat(depth);
    match v {
        serde_json::Value::Object(m) => {
            for (k, val) in m {
                let key = k.replace('-', " ");
                if val.is_object() || val.is_array() {
                    out.push_str(&format!("{pad}{key}:\n"));
                    human_value(out, val, depth + 1);
                } else {
                    out.push_str(&format!("{pad}{key}: {}\n", scalar(val)));
                }
            }
        }
        serde_json::Value::Array(a) => {
            for (i, val) in a.iter().enumerate() {
                out.push_str(&format!("{pad}[{i}]:\n"));
                human_value(out, val, depth + 1);
            }
        }
        other => out.push_str(&format!("{pad}{}\n", scalar(other))),
    }
}

fn scalar(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The absolute size `arg` asks for: `SIZE`, or `+SIZE`/`-SIZE` relative to the image's
/// current virtual size (read by opening it, without backing files).
fn resize_target(image: &Path, format: Option<Format>, arg: &str) -> Result<u64> {
    let (sign, num) = match arg.as_bytes().first() {
        Some(b'+') => (1i8, &arg[1..]),
        Some(b'-') => (-1, &arg[1..]),
        _ => (0, arg),
    };
    let n = cvtnum("image size", num)?;
    if sign == 0 {
        return Ok(n);
    }
    let mut o = OpenOptions::new().without_backing();
    if let Some(f) = format {
        o = o.format(f);
    }
    let current = diskconv::open(image, &o)?.virtual_size();
    let new = if sign > 0 {
        current.checked_add(n)
    } else {
        current.checked_sub(n)
    };
    new.filter(|&v| v > 0)
        .ok_or_else(|| Error::arg("New image size must be positive").with_path(image))
}

#[cfg(test)]
mod tests {
    use super::human_size;

    #[test]
    fn sizes_print_like_qemu() {
        assert_eq!(human_size(1 << 30), "1 GiB");
        assert_eq!(human_size(512), "512 B");
        assert_eq!(human_size(104857600), "100 MiB");
        assert_eq!(human_size(2621440000), "2.44 GiB");
    }
}
