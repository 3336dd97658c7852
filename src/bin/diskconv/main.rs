//! The `diskconv` command: qemu-img-compatible flags over the diskconv library.
//!
//! This file parses and dispatches only. Each subcommand is one file under `commands/`
//! holding its flags (a `clap::Args` struct, whose doc comment is the command's help) and
//! its `exec`; what several commands share sits beside this file, named for what it is.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod commands;
mod errors;
mod flags;
mod guest;
mod json;
mod option_help;
mod progress;
mod signals;
mod sizes;
mod stdin;
mod stdout;
// The object-storage destinations of `convert` (s3://, swift://, glance://).
#[cfg(feature = "remote")]
mod glance;
#[cfg(feature = "remote")]
mod remote;
#[cfg(feature = "remote")]
mod swift;

#[cfg(feature = "remote")]
use commands::{abort_uploads, register};
use commands::{
    cat, check, compare, convert, copy_out, create, info, inspect, ls, map, measure, resize,
    snapshot, sparsify,
};

/// qemu-img's names, listed in `--help` so users need not guess (`vhd` is accepted for `vpc`).
const FORMATS_HELP: &str =
    "Supported formats: raw qcow2 vpc (alias vhd) vmdk vdi vhdx ova; read only: qcow qed";

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

// The order here is `--help`'s. A command's description and usage are its Args struct's
// doc comment and attributes: a `///` line on a variant here would replace them.
// Parsed once per process: the size of the largest variant costs nothing worth boxing for.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Cmd {
    Check(check::CheckArgs),
    Convert(convert::ConvertArgs),
    Create(create::CreateArgs),
    Resize(resize::ResizeArgs),
    Sparsify(sparsify::SparsifyArgs),
    Compare(compare::CompareArgs),
    Map(map::MapArgs),
    Snapshot(snapshot::SnapshotArgs),
    Measure(measure::MeasureArgs),
    Info(info::InfoArgs),
    Inspect(inspect::InspectArgs),
    Ls(ls::LsArgs),
    Cat(cat::CatArgs),
    CopyOut(copy_out::CopyOutArgs),
    #[cfg(feature = "remote")]
    Register(register::RegisterArgs),
    #[cfg(feature = "remote")]
    AbortUploads(abort_uploads::AbortUploadsArgs),
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
    let result = match cli.cmd {
        Cmd::Check(args) => check::exec(args),
        Cmd::Convert(args) => convert::exec(args),
        Cmd::Create(args) => create::exec(args),
        Cmd::Resize(args) => resize::exec(args),
        Cmd::Sparsify(args) => sparsify::exec(args),
        Cmd::Compare(args) => compare::exec(args),
        Cmd::Map(args) => map::exec(args),
        Cmd::Snapshot(args) => snapshot::exec(args),
        Cmd::Measure(args) => measure::exec(args),
        Cmd::Info(args) => info::exec(args),
        Cmd::Inspect(args) => inspect::exec(args),
        Cmd::Ls(args) => ls::exec(args),
        Cmd::Cat(args) => cat::exec(args),
        Cmd::CopyOut(args) => copy_out::exec(args),
        #[cfg(feature = "remote")]
        Cmd::Register(args) => register::exec(args),
        #[cfg(feature = "remote")]
        Cmd::AbortUploads(args) => abort_uploads::exec(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // Failed because a signal's cleanup aborted it (an upload): the cleanup thread
        // ends the process by that signal; exiting 1 first would hide it.
        Err(_) if signals::signalled() => loop {
            std::thread::park();
        },
        Err(e) => {
            eprintln!("diskconv: {}", errors::cli_message(&e));
            ExitCode::FAILURE
        }
    }
}
