//! `ls [-l] [-R] IMG [PATH]`: list a guest directory, like `virt-ls`.

use std::io::Write;

use diskconv::guest::files::{Entry, FileKind, Meta};
use diskconv::guest::inspect::Mounts;
use diskconv::{Error, Result};

use crate::guest::{open, GuestArgs};

/// The most entries `-R` lists before stopping with an error (a hostile tree).
const MAX_LISTED: u64 = 10_000_000;

/// List a directory of the guest: names, or with -l type, mode, owner, size, mtime
/// and link target; -R descends into subdirectories (never through symlinks) and prints
/// full paths. The image is opened read-only and never written.
#[derive(clap::Args, Debug)]
pub struct LsArgs {
    #[command(flatten)]
    guest: GuestArgs,
    /// Long listing.
    #[arg(short = 'l')]
    long: bool,
    /// Recursive: every entry below PATH, with its full path.
    #[arg(short = 'R')]
    recursive: bool,
    /// The guest directory (default /).
    #[arg(default_value = "/")]
    path: String,
}

/// `rwxr-xr-x` with setuid, setgid and sticky as `ls` shows them.
fn mode_string(m: &Meta) -> String {
    let mut s = String::with_capacity(10);
    s.push(m.kind.letter());
    for (i, who) in [(0o4000, 6), (0o2000, 3), (0o1000, 0)].iter().enumerate() {
        let (special, shift) = *who;
        let bits = (m.mode >> shift) & 7;
        s.push(if bits & 4 != 0 { 'r' } else { '-' });
        s.push(if bits & 2 != 0 { 'w' } else { '-' });
        let x = bits & 1 != 0;
        let set = m.mode & special != 0;
        let (on, off) = if i == 2 { ('t', 'T') } else { ('s', 'S') };
        s.push(match (set, x) {
            (true, true) => on,
            (true, false) => off,
            (false, true) => 'x',
            (false, false) => '-',
        });
    }
    s
}

/// UTC date and time of a Unix timestamp, ISO 8601.
pub fn iso_time(t: i64) -> String {
    let days = t.div_euclid(86400);
    let secs = t.rem_euclid(86400);
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

fn join(dir: &str, name: &str) -> String {
    if dir.ends_with('/') {
        format!("{dir}{name}")
    } else {
        format!("{dir}/{name}")
    }
}

struct Lister<'a> {
    mounts: &'a Mounts,
    long: bool,
    listed: u64,
    out: std::io::StdoutLock<'static>,
}

impl Lister<'_> {
    fn line(&mut self, shown: &str, full: &str, e: &Entry) -> Result<()> {
        let mut s = if self.long {
            let m = &e.meta;
            format!(
                "{} {:>5} {:>5} {:>12} {} {shown}",
                mode_string(m),
                m.uid,
                m.gid,
                m.size,
                iso_time(m.mtime)
            )
        } else {
            shown.to_string()
        };
        if self.long && e.meta.kind == FileKind::Symlink {
            let (fs, inner) = self.mounts.resolve(full)?;
            match fs.read_link(&inner) {
                Ok(t) => s += &format!(" -> {t}"),
                Err(err) => s += &format!(" -> ({err})"),
            }
        }
        writeln!(self.out, "{s}").map_err(|e| Error::io("writing stdout", e))
    }

    fn list(&mut self, dir: &str, recursive: bool) -> Result<()> {
        let (fs, inner) = self.mounts.resolve(dir)?;
        let entries = fs.read_dir(&inner)?;
        for e in &entries {
            self.listed += 1;
            if self.listed > MAX_LISTED {
                return Err(Error::limit(format!(
                    "more than {MAX_LISTED} entries under the listed directory"
                )));
            }
            let full = join(dir, &e.name);
            self.line(if recursive { &full } else { &e.name }, &full, e)?;
        }
        if recursive {
            for e in entries.iter().filter(|e| e.meta.kind == FileKind::Dir) {
                if e.lossy {
                    eprintln!("diskconv: note: {dir}: a name that is not UTF-8 is not descended");
                    continue;
                }
                // A directory hard-linked into its own subtree makes the path grow on
                // every turn: the 4096-byte path limit ends the walk with an error.
                self.list(&join(dir, &e.name), true)?;
            }
        }
        Ok(())
    }
}

/// Run `ls`.
pub fn exec(args: LsArgs) -> Result<()> {
    let mounts = open(&args.guest)?;
    let mut l = Lister {
        mounts: &mounts,
        long: args.long,
        listed: 0,
        out: std::io::stdout().lock(),
    };
    l.list(&args.path, args.recursive)?;
    l.out.flush().map_err(|e| Error::io("writing stdout", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_and_modes() {
        assert_eq!(iso_time(0), "1970-01-01T00:00:00Z");
        assert_eq!(iso_time(1_700_000_000), "2023-11-14T22:13:20Z");
        let m = Meta {
            kind: FileKind::File,
            size: 0,
            mode: 0o4755,
            uid: 0,
            gid: 0,
            mtime: 0,
        };
        assert_eq!(mode_string(&m), "-rwsr-xr-x");
    }
}
