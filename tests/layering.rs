//! The shape stays: the core imports nothing above it, the engine knows no format, and no
//! format folder reaches into another. Checked on the source text, so a change that breaks
//! a floor fails `cargo test` with the offending line.

use std::path::{Path, PathBuf};

/// The core floor (the engine included): below every format and every command.
const CORE: &[&str] = &[
    "error.rs",
    "format.rs",
    "inplace.rs",
    "options.rs",
    "references.rs",
    "device.rs",
    "writer.rs",
    "convert.rs",
];

/// What the core may not name.
const ABOVE_CORE: &[&str] = &[
    "crate::formats",
    "crate::ops",
    "crate::probe",
    "crate::inspect",
    "crate::fuzzing",
    "crate::open",
    "crate::create",
];

const FORMATS: &[&str] = &["qcow2", "raw", "vdi", "vhd", "vmdk", "ova"];

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// The code lines of `path` outside its `#[cfg(test)]` module, without comments: tests may
/// use anything, doc links are not imports.
fn code_lines(path: &Path) -> Vec<(usize, String)> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let code = text.split("#[cfg(test)]\nmod tests").next().unwrap_or("");
    code.lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.trim().to_string()))
        .filter(|(_, l)| !l.starts_with("//"))
        .collect()
}

fn rs_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rs_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn core_imports_nothing_from_above() {
    let mut bad = Vec::new();
    for f in CORE {
        let p = src().join(f);
        for (n, line) in code_lines(&p) {
            for above in ABOVE_CORE {
                // `crate::open(` and `crate::formats::` alike; `crate::options` is core.
                let hit = line.match_indices(above).any(|(i, _)| {
                    let next = line[i + above.len()..].chars().next();
                    matches!(
                        next,
                        Some(':') | Some('(') | Some(';') | Some(',') | Some('}')
                    )
                });
                if hit {
                    bad.push(format!("src/{f}:{n}: {line}"));
                }
            }
        }
    }
    assert!(
        bad.is_empty(),
        "core files import from above the core:\n{}",
        bad.join("\n")
    );
}

#[test]
fn no_format_folder_imports_another() {
    let mut bad = Vec::new();
    for own in FORMATS {
        let mut files = Vec::new();
        let dir = src().join("formats").join(own);
        if dir.is_dir() {
            rs_files(&dir, &mut files);
        } else {
            files.push(src().join("formats").join(format!("{own}.rs")));
        }
        for p in files {
            for (n, line) in code_lines(&p) {
                for other in FORMATS.iter().filter(|o| *o != own) {
                    if line.contains(&format!("crate::formats::{other}")) {
                        bad.push(format!("{}:{n}: {line}", p.display()));
                    }
                }
            }
        }
    }
    assert!(
        bad.is_empty(),
        "format folders import each other:\n{}",
        bad.join("\n")
    );
}

#[test]
fn the_checks_see_what_they_check() {
    // Guard against a check that passes because it reads nothing.
    for f in CORE {
        assert!(
            code_lines(&src().join(f))
                .iter()
                .any(|(_, l)| l.starts_with("use ")),
            "{f} has no use lines: did the file move?"
        );
    }
    let engine = code_lines(&src().join("convert.rs"));
    assert!(engine.iter().any(|(_, l)| l.contains("crate::device")));
}

#[test]
fn guest_floor_imports_only_the_core() {
    // Filesystem scanners see a device, never a format, a command or a path.
    let mut files = Vec::new();
    rs_files(&src().join("guest"), &mut files);
    assert!(!files.is_empty(), "src/guest is gone: did it move?");
    let mut bad = Vec::new();
    for p in files {
        for (n, line) in code_lines(&p) {
            for above in ABOVE_CORE {
                if line.contains(&format!("{above}::")) || line.contains(&format!("{above};")) {
                    bad.push(format!("{}:{n}: {line}", p.display()));
                }
            }
        }
    }
    assert!(
        bad.is_empty(),
        "src/guest imports from above the core:\n{}",
        bad.join("\n")
    );
}

/// Every public enum decides whether it may grow: `#[non_exhaustive]` (users matching on it
/// keep a wildcard arm, so a new variant is not a breaking change), or a doc comment line
/// starting `Closed:` that says why its variants are fixed.
#[test]
fn every_public_enum_says_whether_it_grows() {
    let mut files = Vec::new();
    rs_files(&src(), &mut files);
    let mut bad = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        for (i, l) in lines.iter().enumerate() {
            if !l.starts_with("pub enum ") {
                continue;
            }
            // The attribute and doc lines right above the enum.
            let above: Vec<&str> = lines[..i]
                .iter()
                .rev()
                .take_while(|a| a.starts_with("///") || a.starts_with("#["))
                .copied()
                .collect();
            let open = above.iter().any(|a| a.trim() == "#[non_exhaustive]");
            let closed = above.iter().any(|a| a.starts_with("/// Closed: "));
            if open == closed {
                bad.push(format!("{}:{}: {l}", f.display(), i + 1));
            }
        }
    }
    assert!(
        bad.is_empty(),
        "public enums that are neither #[non_exhaustive] nor documented `/// Closed: why` \
         (or are both):\n{}",
        bad.join("\n")
    );
}

/// The formats' dispatch stays dispatch: `formats/mod.rs` (probe, open, create) and
/// `formats/edit.rs` (the in-place side) each under 250 lines; what grows is a format's, in
/// its folder.
#[test]
fn the_dispatch_stays_small() {
    for f in ["formats/mod.rs", "formats/edit.rs"] {
        let n = std::fs::read_to_string(src().join(f))
            .unwrap()
            .lines()
            .count();
        assert!(n <= 250, "src/{f} has {n} lines (at most 250: move what is not dispatch into the format's folder)");
    }
}
