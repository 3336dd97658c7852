//! `sparsify IN OUT` and `sparsify --in-place IMG`: the CLI's side of
//! [`diskconv::sparsify`] and [`diskconv::sparsify_in_place`]. `convert --sparsify` shares
//! [`copy`] and [`human`].

use std::path::{Path, PathBuf};

use diskconv::{ConvertOptions, CreateOptions, Error, Format, OpenOptions, Result};

use crate::flags::{open_options, output_is_json};
use crate::sizes::human_size;
use crate::stdout::side_println;

/// Copy IN into OUT dropping the blocks its guest's filesystems mark free (deleted
/// files' leftovers), read from the partition table and each filesystem's own maps;
/// with --in-place, give them back inside IMG itself. Partitions that do not validate
/// are left untouched and reported.
#[derive(clap::Args, Debug)]
#[command(
    override_usage = "diskconv sparsify [-f FMT] [-O FMT] [-o OPTIONS] [-c] [-S SIZE] [--output=human|json] [-q] IN OUT\n       diskconv sparsify --in-place [-f FMT] [--output=human|json] [-q] IMG",
    args_override_self = true
)]
pub struct SparsifyArgs {
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
}

/// Run `sparsify`: the copy or the in-place change, then its report (on stderr when the
/// copy goes to stdout).
pub fn exec(args: SparsifyArgs) -> Result<()> {
    let json = output_is_json(&args.output)?;
    let open = open_options(args.src_format.as_deref(), args.allow_references)?;
    let (report, to_stderr) = if args.in_place {
        (in_place(&args, open)?, false)
    } else {
        let dst = args.dst.as_deref().ok_or_else(|| {
            Error::arg("sparsify needs IN and OUT, or --in-place IMG (diskconv sparsify --help)")
        })?;
        let opts = copy_options(&args, open)?;
        let to_stdout = dst.as_os_str() == "-";
        if to_stdout {
            crate::stdout::refuse_terminal()?;
        }
        crate::signals::remove_temp_on_interrupt(dst);
        (copy(&args.src, dst, &opts)?, to_stdout)
    };
    if json {
        let text = serde_json::to_string_pretty(&crate::json::kebab_json(&report)).expect("json");
        side_println(to_stderr, &text);
    } else if !args.quiet {
        let text = human(&report);
        side_println(to_stderr, text.trim_end());
    }
    Ok(())
}

/// `--in-place IMG`: the free blocks given back inside the image itself.
fn in_place(args: &SparsifyArgs, open: OpenOptions) -> Result<diskconv::SparsifyReport> {
    if args.dst.is_some() || args.out_format.is_some() || !args.options.is_empty() || args.compress
    {
        return Err(Error::arg(
            "sparsify --in-place takes one image and no -O, -o, -c or OUT",
        ));
    }
    let mut opts = diskconv::SparsifyOptions::new(Format::Raw);
    opts.convert.open = open;
    diskconv::sparsify_in_place(&args.src, &opts)
}

/// The copy's options: the output format is the input's unless -O says otherwise.
fn copy_options(args: &SparsifyArgs, open: OpenOptions) -> Result<ConvertOptions<'static>> {
    let format = match &args.out_format {
        Some(f) => Format::from_name(f)?,
        None => match open.format {
            Some(f) => f,
            None => diskconv::probe(&args.src)?,
        },
    };
    let mut create = CreateOptions {
        compress: args.compress,
        ..Default::default()
    };
    for o in &args.options {
        create.parse_option_string(o)?;
    }
    let mut opts = ConvertOptions::new(format);
    opts.open = open;
    opts.create = create;
    opts.min_sparse = crate::sizes::sparse_size_arg(&args.sparse_size)?;
    opts.threads = args.threads;
    Ok(opts)
}

/// `sparsify` (and `convert --sparsify`) into DST, or into stdout when DST is `-`.
pub fn copy(src: &Path, dst: &Path, opts: &ConvertOptions) -> Result<diskconv::SparsifyReport> {
    let sopts = diskconv::SparsifyOptions {
        convert: opts.clone(),
    };
    if dst.as_os_str() != "-" {
        return diskconv::sparsify(src, dst, &sopts);
    }
    diskconv::sparsify_to_writer(src, crate::stdout::file()?, &sopts)
}

/// The sparsify report for people: one line per partition, then the totals.
pub fn human(r: &diskconv::SparsifyReport) -> String {
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
