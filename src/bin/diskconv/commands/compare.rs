//! `compare IMG1 IMG2`: the CLI's side of [`diskconv::compare`] (flags, what is printed,
//! qemu-img's exit codes).

use std::io::Write;
use std::path::PathBuf;

use diskconv::{Error, Result};

use crate::errors::cli_message;
use crate::flags::open_options;

/// Compare the guest contents of two images (exit 0 identical, 1 different, 2+ error).
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

/// Run `compare`; never returns: exits with its code (it prints its own errors).
pub fn exec(args: CompareArgs) -> Result<()> {
    std::process::exit(compare(&args))
}

/// `compare`'s exit code: 0 identical, 1 different, 2 an image cannot be opened, 3 block
/// status failed, 4 a read failed (qemu-img's codes).
fn compare(a: &CompareArgs) -> i32 {
    let opts = (|| {
        Ok::<_, Error>((
            open_options(a.format1.as_deref(), a.allow_references)?,
            open_options(a.format2.as_deref(), a.allow_references)?,
        ))
    })();
    let (o1, o2) = match opts {
        Ok(o) => o,
        Err(e) => {
            eprintln!("diskconv: {}", cli_message(&e));
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
                eprintln!("diskconv: {}", cli_message(&e.error));
            } else {
                let name = if e.image == 1 { &a.img1 } else { &a.img2 };
                eprintln!("diskconv: {}: {e}", name.display());
            }
            i32::from(e.exit_code())
        }
    }
}
