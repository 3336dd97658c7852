//! `check [-f FMT] [--output=human|json] [-r leaks|all] [-q] [--allow-references] IMG`: the
//! CLI's side of [`diskconv::check`] (flags, what is printed, the exit code qemu-img gives).

use std::path::PathBuf;

use diskconv::{CheckOptions, Format, Repair, Result};

/// Check an image's metadata like qemu-img check (exit 0 clean, 1 not completed,
/// 2 corruptions, 3 leaks only, 63 no checks for the format); -r repairs in place.
#[derive(clap::Args, Debug)]
#[command(
    override_usage = "diskconv check [-f FMT] [--output=human|json] [-r leaks|all] [-q] [--allow-references] IMG",
    args_override_self = true
)]
pub struct CheckArgs {
    /// Image format (never probed when given).
    #[arg(short = 'f')]
    pub format: Option<String>,
    /// human (qemu-img's text) or json (qemu-img's keys).
    #[arg(long = "output", default_value = "human")]
    pub output: String,
    /// Repair: leaks (free leaked space, truncate to the image end) or all (also the
    /// corruptions that can be fixed safely).
    #[arg(short = 'r')]
    pub repair: Option<String>,
    /// Quiet: print nothing on stdout (the exit code still says what was found).
    #[arg(short = 'q')]
    pub quiet: bool,
    /// Allow opening the extent files a vmdk descriptor names (monolithicFlat,
    /// twoGbMaxExtent*), confined to its folder.
    #[arg(long = "allow-references", alias = "allow-backing")]
    pub allow_references: bool,
    /// Image.
    pub image: PathBuf,
}

/// Run `check`; never returns on success (exits with qemu-img's code: 0 clean, 1 check
/// not completed, 2 corruptions, 3 leaks only, 63 no checks for this format).
pub fn exec(args: CheckArgs) -> Result<()> {
    let json = crate::flags::output_is_json(&args.output)?;
    let opts = CheckOptions {
        format: args.format.as_deref().map(Format::from_name).transpose()?,
        repair: args
            .repair
            .as_deref()
            .map(Repair::parse)
            .transpose()?
            .unwrap_or_default(),
        allow_references: args.allow_references,
        ..Default::default()
    };
    let report = match diskconv::check(&args.image, &opts) {
        Ok(r) => r,
        Err(e) => {
            // The check could not be completed (the image does not open, an I/O error).
            eprintln!("diskconv: Check failed: {}", crate::errors::cli_message(&e));
            std::process::exit(1);
        }
    };
    if !report.supported {
        eprintln!("diskconv: This image format does not support checks");
        std::process::exit(63);
    }
    for line in report
        .repaired_findings
        .iter()
        .chain(&report.tally.findings)
    {
        eprintln!("{line}");
    }
    if !args.quiet {
        if json {
            // Four-space indentation, as qemu-img prints it.
            let mut out = Vec::new();
            let fmt = serde_json::ser::PrettyFormatter::with_indent(b"    ");
            let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
            serde::Serialize::serialize(&report.json(), &mut ser).expect("a JSON value serializes");
            println!("{}", String::from_utf8_lossy(&out));
        } else {
            print!("{}", report.human());
        }
    }
    if report.tally.check_errors > 0 {
        eprintln!("diskconv: Check failed");
    }
    std::process::exit(report.exit_code());
}
