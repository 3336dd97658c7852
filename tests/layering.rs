//! The shape stays: the core imports nothing above it, the engine knows no format, no
//! format folder reaches into another or up into the commands, and no core file grows past
//! what one reading takes. Checked on the source text, so a change that breaks a floor
//! fails `cargo test` with the offending line.

use std::path::{Path, PathBuf};

/// The core floor (the engine included): below every format and every command. Paths
/// under `src/`.
const CORE: &[&str] = &[
    "error.rs",
    "format.rs",
    "inplace.rs",
    "options.rs",
    "references.rs",
    "device/host.rs",
    "device/mod.rs",
    "check.rs",
    "writer/mod.rs",
    "writer/plan.rs",
    "writer/uuid.rs",
    "writer/zeros.rs",
    "writer/digest.rs",
    "writer/edit.rs",
    "writer/atomic.rs",
    "writer/sink.rs",
    "writer/output.rs",
    "convert/pace.rs",
    "convert/salvage.rs",
    "convert/mod.rs",
    "convert/tests.rs",
];

/// The files of each core folder, lowest first: each may import only the ones before it
/// (no cycles; the writer's digest knows nothing of sinks, a sink may use digest).
const FOLDER_FLOORS: &[(&str, &[&str])] = &[
    (
        "writer",
        &[
            "plan", "uuid", "zeros", "digest", "edit", "atomic", "sink", "output", "mod",
        ],
    ),
    ("convert", &["pace", "salvage", "mod", "tests"]),
    ("device", &["host", "mod"]),
];

/// What the core may not name: the crate-root modules and functions above it.
const ABOVE_CORE: &[&str] = &[
    "formats", "ops", "probe", "inspect", "fuzzing", "open", "create", "guest", "pipe", "remote",
];

/// Longest a core file may be, its tests included: a file longer than this holds more
/// than one idea; split it (see `src/writer/`).
const CORE_MAX_LINES: usize = 700;

const FORMATS: &[&str] = &["qcow2", "raw", "vdi", "vhd", "vmdk", "ova"];

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// The code of `text` outside its `#[cfg(test)]` module, without comment lines (tests
/// may use anything, doc links are not imports), as (line number, trimmed line).
fn code_of(text: &str) -> Vec<(usize, String)> {
    let code = text.split("#[cfg(test)]\nmod tests").next().unwrap_or("");
    code.lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.trim().to_string()))
        .filter(|(_, l)| !l.starts_with("//"))
        .collect()
}

fn code_lines(path: &Path) -> Vec<(usize, String)> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    code_of(&text)
}

/// The module path of a file under `src/` (`formats/qcow2/check.rs` is
/// `["formats", "qcow2", "check"]`, a `mod.rs` its folder's, `lib.rs` the root).
fn module_of(rel: &Path) -> Vec<String> {
    let mut m: Vec<String> = rel
        .with_extension("")
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if matches!(m.last().map(String::as_str), Some("mod" | "lib" | "main")) {
        m.pop();
    }
    m
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// The identifier at the start of `s` (after spaces).
fn ident(s: &str) -> &str {
    let s = s.trim_start();
    &s[..s.find(|c: char| !is_ident(c)).unwrap_or(s.len())]
}

/// What the code of a file in `module` names, as (line, path below the crate root, line
/// text): for `crate::a::b` and a `super::` chain climbing to `a` alike, the path from the
/// crate root (`["a", "b"]`, as far as it goes); for each item of a group
/// `crate::{a::x, b}` (over several lines too), its own path (`["a", "x"]`, `["b"]`).
fn paths_named(code: &[(usize, String)], module: &[String]) -> Vec<(usize, Vec<String>, String)> {
    // One text with a line number per byte, so a group spanning lines is read whole.
    let mut text = String::new();
    let mut line_of = Vec::new();
    for (n, l) in code {
        text.push_str(l);
        text.push('\n');
        line_of.resize(text.len(), *n);
    }
    let shown = |at: usize| {
        let n = line_of[at];
        let l = code.iter().find(|(m, _)| *m == n).map(|(_, l)| l.clone());
        (n, l.unwrap_or_default())
    };
    let mut out = Vec::new();
    let mut at = 0;
    while at < text.len() {
        let rest = &text[at..];
        let boundary = text[..at]
            .chars()
            .next_back()
            .is_none_or(|c| !is_ident(c) && c != ':');
        let (base, tail) = if boundary && rest.starts_with("crate::") {
            (Vec::new(), &rest["crate::".len()..])
        } else if boundary && rest.starts_with("super::") {
            let mut t = rest;
            let mut ups = 0;
            while let Some(r) = t.strip_prefix("super::") {
                t = r;
                ups += 1;
            }
            if ups > module.len() {
                at += 1;
                continue;
            }
            (module[..module.len() - ups].to_vec(), t)
        } else {
            at += rest.chars().next().map_or(1, char::len_utf8);
            continue;
        };
        let (n, l) = shown(at);
        for p in expand(base, tail) {
            out.push((n, p, l.clone()));
        }
        at += rest.len() - tail.len();
    }
    out.retain(|(_, p, _)| !p.is_empty());
    out
}

/// The paths `tail` names below `base`: `a::b` is one, `a::{b, c::{d, e}}` three
/// (`a::b`, `a::c::d`, `a::c::e`), the group read up to its closing brace.
fn expand(mut base: Vec<String>, tail: &str) -> Vec<Vec<String>> {
    let mut t = tail.trim_start();
    loop {
        if let Some(group) = t.strip_prefix('{') {
            // Split the group at its top-level commas.
            let mut out = Vec::new();
            let (mut depth, mut start) = (0usize, 0usize);
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        out.extend(expand(base.clone(), &group[start..i]));
                        return out;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        out.extend(expand(base.clone(), &group[start..i]));
                        start = i + 1;
                    }
                    _ => {}
                }
            }
            return out;
        }
        let id = ident(t);
        if id.is_empty() {
            break;
        }
        base.push(id.to_string());
        match t[id.len()..].trim_start().strip_prefix("::") {
            Some(r) => t = r.trim_start(),
            None => break,
        }
    }
    vec![base]
}

fn paths_in_file(rel: &str) -> Vec<(usize, Vec<String>, String)> {
    paths_named(&code_lines(&src().join(rel)), &module_of(Path::new(rel)))
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

fn rel(p: &Path) -> String {
    p.strip_prefix(src())
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

#[test]
fn core_imports_nothing_from_above() {
    let mut bad = Vec::new();
    for f in CORE {
        for (n, path, line) in paths_in_file(f) {
            if ABOVE_CORE.contains(&path[0].as_str()) {
                bad.push(format!("src/{f}:{n}: {line}"));
            }
        }
    }
    bad.dedup();
    assert!(
        bad.is_empty(),
        "core files import from above the core:\n{}",
        bad.join("\n")
    );
}

#[test]
fn no_format_imports_the_commands() {
    // The formats sit under the commands: what they share with them (the check
    // vocabulary) lives in the core.
    let mut files = Vec::new();
    rs_files(&src().join("formats"), &mut files);
    assert!(files.len() > 20, "src/formats is gone: did it move?");
    let mut bad = Vec::new();
    for p in files {
        let r = rel(&p);
        for (n, path, line) in paths_in_file(&r) {
            if path[0] == "ops" {
                bad.push(format!("src/{r}:{n}: {line}"));
            }
        }
    }
    bad.dedup();
    assert!(
        bad.is_empty(),
        "formats import crate::ops:\n{}",
        bad.join("\n")
    );
}

#[test]
fn core_files_are_short() {
    let mut long = Vec::new();
    for f in CORE {
        let text = std::fs::read_to_string(src().join(f)).unwrap();
        let n = text.lines().count();
        if n > CORE_MAX_LINES {
            long.push(format!("src/{f}: {n} lines"));
        }
    }
    assert!(
        long.is_empty(),
        "core files over {CORE_MAX_LINES} lines (split them, one idea per file):\n{}",
        long.join("\n")
    );
}

#[test]
fn every_file_of_a_core_folder_is_core() {
    let mut bad = Vec::new();
    for dir in ["writer", "convert", "device"] {
        let mut files = Vec::new();
        rs_files(&src().join(dir), &mut files);
        assert!(files.len() >= 2, "src/{dir}/ is gone: did it move?");
        for p in files {
            let r = rel(&p);
            if !CORE.contains(&r.as_str()) {
                bad.push(format!("src/{r}"));
            }
        }
    }
    bad.dedup();
    assert!(
        bad.is_empty(),
        "files in a core folder missing from CORE (so unchecked):\n{}",
        bad.join("\n")
    );
}

#[test]
fn core_folder_files_import_only_those_below() {
    let mut bad = Vec::new();
    for (dir, floors) in FOLDER_FLOORS {
        let mut files = Vec::new();
        rs_files(&src().join(dir), &mut files);
        for p in &files {
            let r = rel(p);
            let stem = p.file_stem().unwrap().to_string_lossy().into_owned();
            let Some(own) = floors.iter().position(|w| *w == stem) else {
                bad.push(format!("src/{r} is not in FOLDER_FLOORS"));
                continue;
            };
            for (n, path, line) in paths_in_file(&r) {
                if path.len() < 2 || path[0] != *dir {
                    continue;
                }
                match floors.iter().position(|w| *w == path[1]) {
                    Some(other) if other < own => {}
                    // An item of mod.rs (crate::writer::Sink) from below it: a cycle
                    // through the re-export; name the file that defines it.
                    _ => bad.push(format!("src/{r}:{n}: {line}")),
                }
            }
        }
    }
    bad.dedup();
    assert!(
        bad.is_empty(),
        "core folder files out of their floors (each imports only those below it):\n{}",
        bad.join("\n")
    );
}

#[test]
fn the_path_reader_sees_what_the_checks_need() {
    // The checks above pass when they find nothing: make sure they would find it.
    let code = code_of(
        "use crate::{\n    error::Error,\n    ops::check::Tally,\n};\nuse super::super::ops::x;\n\
         let d = crate::open(p);\nuse super::sink::{Sink, x::{A, B}};\n",
    );
    let m = module_of(Path::new("formats/qcow2/mod.rs"));
    let got: Vec<(usize, String)> = paths_named(&code, &m)
        .into_iter()
        .map(|(n, p, _)| (n, p.join("::")))
        .collect();
    let want = [
        (1, "error::Error"),
        (1, "ops::check::Tally"),
        (5, "ops::x"),
        (6, "open"),
        (7, "formats::sink::Sink"),
        (7, "formats::sink::x::A"),
        (7, "formats::sink::x::B"),
    ];
    assert_eq!(
        got,
        want.iter()
            .map(|(n, p)| (*n, p.to_string()))
            .collect::<Vec<_>>()
    );
    assert_eq!(
        module_of(Path::new("formats/qcow2/check.rs")),
        ["formats", "qcow2", "check"]
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
    bad.dedup();
    assert!(
        bad.is_empty(),
        "format folders import each other:\n{}",
        bad.join("\n")
    );
}

#[test]
fn the_checks_see_what_they_check() {
    // Guard against a check that passes because it reads nothing (a file moved).
    let names = |f: &str| -> Vec<String> {
        paths_in_file(f)
            .into_iter()
            .map(|(_, p, _)| p.join("::"))
            .collect()
    };
    for f in CORE {
        assert!(
            !code_lines(&src().join(f)).is_empty(),
            "{f} has no code: did the file move?"
        );
    }
    assert!(names("convert/mod.rs")
        .iter()
        .any(|p| p.starts_with("device")));
    assert!(names("writer/output.rs")
        .iter()
        .any(|p| p == "writer::sink::Sink"));
    assert!(names("formats/qcow2/check.rs")
        .iter()
        .any(|p| p == "check::Tally"));
}

#[test]
fn guest_floor_imports_only_the_core() {
    // Filesystem scanners see a device, never a format, a command or a path.
    let mut files = Vec::new();
    rs_files(&src().join("guest"), &mut files);
    assert!(!files.is_empty(), "src/guest is gone: did it move?");
    let mut bad = Vec::new();
    for p in files {
        let r = rel(&p);
        for (n, path, line) in paths_in_file(&r) {
            if path[0] != "guest" && ABOVE_CORE.contains(&path[0].as_str()) {
                bad.push(format!("src/{r}:{n}: {line}"));
            }
        }
    }
    bad.dedup();
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
    bad.dedup();
    assert!(
        bad.is_empty(),
        "public enums that are neither #[non_exhaustive] nor documented `/// Closed: why` \
         (or are both):\n{}",
        bad.join("\n")
    );
}
