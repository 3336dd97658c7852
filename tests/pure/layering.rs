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

/// The binary lives in one place, cargo's shape: `src/bin/diskconv/` (its `main.rs`, one
/// file per subcommand under `commands/`, and what they share). A CLI file at the library's
/// root (`src/main.rs`, `src/cli_*.rs`) or CLI crates used outside that folder fail here.
#[test]
fn the_binary_lives_in_src_bin_diskconv() {
    let bin = src().join("bin").join("diskconv");
    assert!(
        bin.join("main.rs").is_file() && bin.join("commands").is_dir(),
        "src/bin/diskconv/main.rs or its commands/ folder is gone: did the binary move?"
    );
    let mut bad = Vec::new();
    for e in std::fs::read_dir(src()).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        if name == "main.rs" || (name.starts_with("cli_") && name.ends_with(".rs")) {
            bad.push(format!("src/{name}"));
        }
    }
    // Nothing else under src/bin: cargo would build every file there as a binary of its own.
    for e in std::fs::read_dir(src().join("bin")).unwrap() {
        let p = e.unwrap().path();
        if p != bin {
            bad.push(p.display().to_string());
        }
    }
    // The CLI's crates (feature `cli`) are the binary's only: the library never names them.
    let mut files = Vec::new();
    rs_files(&src(), &mut files);
    for f in files.iter().filter(|f| !f.starts_with(&bin)) {
        for (n, line) in code_lines(f) {
            if line.contains("clap::") || line.contains("indicatif::") {
                let rel = f.strip_prefix(src().parent().unwrap()).unwrap();
                bad.push(format!("{}:{n}: {line}", rel.display()));
            }
        }
    }
    assert!(
        bad.is_empty(),
        "binary code outside src/bin/diskconv/:\n{}",
        bad.join("\n")
    );
}

/// Longest a function may be, in lines from its `fn` to its closing brace.
const MAX_FN_LINES: usize = 200;

/// `text` with comments, string and char literals blanked (newlines kept), so that braces
/// and `fn` are only counted where they are code.
fn code_only(text: &str) -> Vec<u8> {
    let b = text.as_bytes();
    let mut out = b.to_vec();
    let blank = |out: &mut Vec<u8>, from: usize, to: usize| {
        for c in &mut out[from..to] {
            if *c != b'\n' {
                *c = b' ';
            }
        }
    };
    let mut i = 0;
    while i < b.len() {
        let rest = &b[i..];
        if rest.starts_with(b"//") {
            let end = rest
                .iter()
                .position(|&c| c == b'\n')
                .map_or(b.len(), |p| i + p);
            blank(&mut out, i, end);
            i = end;
        } else if rest.starts_with(b"/*") {
            let (mut depth, mut j) = (1, i + 2);
            while j < b.len() && depth > 0 {
                if b[j..].starts_with(b"/*") {
                    depth += 1;
                    j += 2;
                } else if b[j..].starts_with(b"*/") {
                    depth -= 1;
                    j += 2;
                } else {
                    j += 1;
                }
            }
            blank(&mut out, i, j);
            i = j;
        } else if let Some(hashes) = raw_string_start(b, i) {
            // r"..." or r#"..."# (also br): ends at `"` followed by as many `#`.
            let open = b[i..].iter().position(|&c| c == b'"').unwrap() + i;
            let close: Vec<u8> = std::iter::once(b'"')
                .chain(std::iter::repeat_n(b'#', hashes))
                .collect();
            let end = b[open + 1..]
                .windows(close.len())
                .position(|w| w == close.as_slice())
                .map_or(b.len(), |p| open + 1 + p + close.len());
            blank(&mut out, i, end);
            i = end;
        } else if b[i] == b'"' {
            let mut j = i + 1;
            while j < b.len() && b[j] != b'"' {
                j += if b[j] == b'\\' { 2 } else { 1 };
            }
            blank(&mut out, i, (j + 1).min(b.len()));
            i = j + 1;
        } else if b[i] == b'\'' {
            // A char literal ('x', '\n', '\u{..}', '{'), not a lifetime ('a).
            let end = if rest.get(1) == Some(&b'\\') {
                rest.iter()
                    .skip(2)
                    .position(|&c| c == b'\'')
                    .map(|p| i + 2 + p + 1)
            } else if rest.len() > 2 && rest[2] == b'\'' {
                Some(i + 3)
            } else {
                // A multi-byte char between quotes, or a lifetime (no closing quote near).
                let s = &text[i + 1..];
                s.chars().next().and_then(|c| {
                    let k = i + 1 + c.len_utf8();
                    (b.get(k) == Some(&b'\'')).then_some(k + 1)
                })
            };
            match end {
                Some(e) => {
                    blank(&mut out, i, e);
                    i = e;
                }
                None => i += 1,
            }
        } else {
            i += 1;
        }
    }
    out
}

/// The number of `#` of a raw string literal starting at `i` (`r"`, `r#"`, `br"`), if one does.
fn raw_string_start(b: &[u8], i: usize) -> Option<usize> {
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    if i > 0 && ident(b[i - 1]) {
        return None;
    }
    let j = if b[i..].starts_with(b"br") {
        i + 2
    } else if b[i] == b'r' {
        i + 1
    } else {
        return None;
    };
    let hashes = b[j..].iter().take_while(|&&c| c == b'#').count();
    (b.get(j + hashes) == Some(&b'"')).then_some(hashes)
}

/// Every function with a body in `text`: (name, first line, line count).
fn functions(text: &str) -> Vec<(String, usize, usize)> {
    let code = code_only(text);
    let line_of = |pos: usize| code[..pos].iter().filter(|&&c| c == b'\n').count() + 1;
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    let mut found = Vec::new();
    let mut i = 0;
    while let Some(p) = code[i..].windows(3).position(|w| w == b"fn ") {
        let at = i + p;
        i = at + 3;
        if at > 0 && ident(code[at - 1]) {
            continue;
        }
        let name: String = code[i..]
            .iter()
            .take_while(|&&c| ident(c))
            .map(|&c| c as char)
            .collect();
        if name.is_empty() {
            continue; // `fn(..)` pointer types
        }
        // The body opens at the first `{` outside the signature's () and []; a `;` there
        // first is a declaration without a body.
        let (mut depth, mut j) = (0i32, i + name.len());
        let open = loop {
            match code.get(j) {
                None => break None,
                Some(b'(' | b'[') => depth += 1,
                Some(b')' | b']') => depth -= 1,
                Some(b';') if depth == 0 => break None,
                Some(b'{') if depth == 0 => break Some(j),
                _ => {}
            }
            j += 1;
        };
        let Some(open) = open else { continue };
        let mut braces = 0i32;
        let close = (open..code.len()).find(|&k| {
            match code[k] {
                b'{' => braces += 1,
                b'}' => braces -= 1,
                _ => {}
            }
            braces == 0
        });
        let close = close.unwrap_or(code.len() - 1);
        found.push((name, line_of(at), line_of(close) - line_of(at) + 1));
    }
    found
}

/// No function anywhere in src/ (library and binary) runs past [`MAX_FN_LINES`] lines:
/// a newcomer reads one whole.
#[test]
fn no_function_is_longer_than_200_lines() {
    let mut files = Vec::new();
    rs_files(&src(), &mut files);
    files.sort();
    let mut long = Vec::new();
    let mut counted = 0;
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        let rel = f.strip_prefix(src().parent().unwrap()).unwrap();
        for (name, line, lines) in functions(&text) {
            counted += 1;
            if lines > MAX_FN_LINES {
                long.push((format!("{}::{name}", rel.display()), line, lines));
            }
        }
    }
    // Guard against a scan that passes because it finds nothing.
    assert!(counted > 1000, "only {counted} functions found in src/");
    let bad: Vec<String> = long
        .iter()
        .map(|(id, line, n)| format!("{id} (line {line}): {n} lines"))
        .collect();
    assert!(
        bad.is_empty(),
        "functions longer than {MAX_FN_LINES} lines (split them):\n{}",
        bad.join("\n")
    );
}

#[test]
fn the_function_scan_measures_what_it_should() {
    let text = "fn a() {\n    let s = \"}\"; let c = '{';\n    // }\n}\n\
                fn b<'x>(v: [u8; 2], f: fn(u8)) -> &'x str where {\n    r#\"{\"#\n}\n\
                trait T { fn c(&self); }\n";
    let found = functions(text);
    let names: Vec<(&str, usize, usize)> =
        found.iter().map(|(n, l, c)| (n.as_str(), *l, *c)).collect();
    assert_eq!(names, [("a", 1, 4), ("b", 5, 3)]);
}

/// Inside a format folder, the files import one another without a circle (`mod.rs`, which
/// wires the folder together, aside): the in-place editor type sits in its own file, under
/// both `resize.rs` and `discard.rs`, so a newcomer reads a folder from the bottom up.
#[test]
fn no_format_folder_has_a_circle() {
    let mut bad = Vec::new();
    let formats = src().join("formats");
    for e in std::fs::read_dir(&formats).unwrap() {
        let dir = e.unwrap().path();
        if !dir.is_dir() {
            continue;
        }
        let folder = dir.file_name().unwrap().to_string_lossy().into_owned();
        let mut files = Vec::new();
        rs_files(&dir, &mut files);
        // file stem -> the sibling stems it names
        let mut edges: std::collections::BTreeMap<String, std::collections::BTreeSet<String>> =
            Default::default();
        for p in &files {
            let r = rel(p);
            let m = module_of(Path::new(&r));
            if m.len() != 3 {
                continue; // mod.rs (the folder's wiring) or a deeper file
            }
            let me = m[2].clone();
            let named = paths_in_file(&r);
            let set = edges.entry(me.clone()).or_default();
            for (_, path, _) in named {
                if path.len() >= 3 && path[0] == "formats" && path[1] == folder && path[2] != me {
                    set.insert(path[2].clone());
                }
            }
        }
        // Depth-first search for a back edge, reporting the circle it closes.
        fn visit(
            n: &str,
            edges: &std::collections::BTreeMap<String, std::collections::BTreeSet<String>>,
            stack: &mut Vec<String>,
            done: &mut std::collections::BTreeSet<String>,
            out: &mut Vec<String>,
        ) {
            if done.contains(n) {
                return;
            }
            if let Some(i) = stack.iter().position(|s| s == n) {
                out.push(format!("{} -> {n}", stack[i..].join(" -> ")));
                return;
            }
            stack.push(n.to_string());
            for m in edges.get(n).into_iter().flatten() {
                if edges.contains_key(m) {
                    visit(m, edges, stack, done, out);
                }
            }
            stack.pop();
            done.insert(n.to_string());
        }
        let mut done = Default::default();
        let mut found = Vec::new();
        for n in edges.keys() {
            visit(n, &edges, &mut Vec::new(), &mut done, &mut found);
        }
        bad.extend(found.into_iter().map(|c| format!("formats/{folder}: {c}")));
    }
    assert!(
        bad.is_empty(),
        "circles inside format folders:\n{}",
        bad.join("\n")
    );
}
