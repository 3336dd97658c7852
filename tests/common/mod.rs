//! Helpers shared by the integration tests: qemu-img as the oracle, sample images,
//! the corpus in tests/data, and counters of the work a test does. Each test file uses
//! the parts it needs.
#![allow(dead_code)]

pub mod cmms;
pub mod crash;
pub mod discard;
pub mod guestfs;
pub mod guestfs_nx;
pub mod hive;
pub mod mounts;
pub mod readonly;
pub mod resize;
pub mod snapshot;
pub mod sparsify;
pub mod stream;
pub mod variants;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use diskconv::{BlockDevice, ConvertOptions, Format, OpenOptions};

/// What installs every tool the tests use (./scripts/test runs it when one is missing).
pub const INSTALL_HINT: &str = "apt-get install qemu-utils bzip2 time";

/// True when the oracles must be there: `CI` set (to anything but `false`/`0`) or
/// `DISKCONV_REQUIRE_QEMU=1`. Then a missing tool fails the test that needs it instead of
/// skipping it; build.rs reads the same variables to decide what cargo may ignore.
pub fn oracles_required() -> bool {
    let ci = std::env::var("CI").is_ok_and(|v| !matches!(v.as_str(), "" | "0" | "false"));
    ci || std::env::var("DISKCONV_REQUIRE_QEMU").is_ok_and(|v| v == "1")
}

/// True when `tool --version` runs.
fn tool_runs(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Whether `tool` is installed. Missing, it panics (the install command in the message)
/// when the oracles are required or when build.rs saw it (`missing_at_build` false: the
/// test was not marked ignored, so returning would count a test that did not run as
/// passed); otherwise it notes the skip and returns false.
#[track_caller]
fn have_tool(tool: &str, package: &str, missing_at_build: bool) -> bool {
    if tool_runs(tool) {
        return true;
    }
    assert!(
        !oracles_required(),
        "{tool} not found and CI or DISKCONV_REQUIRE_QEMU=1 is set: `apt-get install {package}` \
         (or ./scripts/test, which installs what the tests need)"
    );
    assert!(
        missing_at_build,
        "{tool} not found, but it was there when the tests were built: `apt-get install \
         {package}`, or rebuild so the tests that need it are ignored"
    );
    eprintln!("{tool} not found: its part of this test is skipped (apt-get install {package})");
    false
}

/// True when qemu-img is installed. Tests that need it throughout carry
/// `#[cfg_attr(no_qemu, ignore = "...")]` (build.rs), so without it cargo reports them as
/// ignored; a test that only cross-checks with it runs its own part and skips the rest.
/// With the oracles required (CI), a missing qemu-img fails the test.
#[track_caller]
pub fn have_qemu() -> bool {
    have_tool("qemu-img", "qemu-utils", cfg!(no_qemu))
}

/// True when qemu-io (also from qemu-utils) is installed; same rules as [`have_qemu`].
#[track_caller]
pub fn have_qemu_io() -> bool {
    have_tool("qemu-io", "qemu-utils", cfg!(no_qemu))
}

/// True when bzip2 (which unpacks the corpus's `.bz2` files) is installed; tests that need
/// it carry `#[cfg_attr(no_bzip2, ignore = "...")]`.
#[track_caller]
pub fn have_bzip2() -> bool {
    have_tool("bzip2", "bzip2", cfg!(no_bzip2))
}

/// Run a command, panic with its stderr unless it succeeds, return stdout.
pub fn run(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", args[0]));
    assert!(
        out.status.success(),
        "{:?} failed: {}{}",
        args,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Run `qemu-img ARGS...`.
pub fn qemu_img(args: &[&str]) -> String {
    let mut v = vec!["qemu-img"];
    v.extend_from_slice(args);
    run(&v)
}

/// Path as &str.
pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Deterministic xorshift for test data without a dependency.
pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// Write a raw image of `size` bytes mixing holes, random data, written zeros and
/// compressible text in 64 KiB-ish pieces, so every mapping kind and compression path
/// is exercised. Deterministic in `seed`.
pub fn make_raw(path: &Path, size: u64, seed: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    let mut rng = Rng(seed | 1);
    let mut off = 0u64;
    while off < size {
        let len = (rng.next() % (192 << 10) + 1).min(size - off);
        let mut buf = vec![0u8; len as usize];
        match rng.next() % 5 {
            0 | 1 => {
                off += len;
                continue;
            }
            2 => rng.fill(&mut buf),
            3 => {
                for (i, b) in buf.iter_mut().enumerate() {
                    *b = b"the quick brown fox jumps over the lazy dog "[i % 44];
                }
            }
            _ => {} // written zeros
        }
        f.write_all_at(&buf, off).unwrap();
        off += len;
    }
}

/// sha256 of a device's guest bytes, via the library's Read adapter, skipping the read of
/// zero ranges (hashing zeros from a static buffer).
pub fn sha256_device(dev: &dyn BlockDevice) -> String {
    let size = dev.virtual_size();
    let mut h = Sha256::new();
    let zeros = vec![0u8; 1 << 20];
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < size {
        let m = dev.map(off, (size - off).min(1 << 20)).unwrap();
        assert_eq!(m.offset, off);
        let n = m.len.min(size - off).min(1 << 20) as usize;
        assert!(n > 0);
        if m.is_zero() {
            h.update(&zeros[..n]);
        } else {
            dev.read_at(&mut buf[..n], off).unwrap();
            h.update(&buf[..n]);
        }
        off += n as u64;
    }
    hex(&h.finalize())
}

/// sha256 of a file's bytes.
pub fn sha256_file(path: &Path) -> String {
    let mut f = std::fs::File::open(path).unwrap();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    hex(&h.finalize())
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Open with the format named (no probing).
pub fn open_as(path: &Path, fmt: Format) -> Box<dyn BlockDevice> {
    diskconv::open(path, &OpenOptions::new().format(fmt))
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

/// Assert our reading of `img` (format `fmt`) equals qemu-img's `convert -O raw` of it,
/// and the virtual sizes agree.
pub fn assert_reads_like_qemu(img: &Path, fmt: Format, dir: &Path) {
    let raw = dir.join(format!(
        "{}.qemu.raw",
        img.file_name().unwrap().to_string_lossy()
    ));
    qemu_img(&["convert", "-f", fmt.name(), "-O", "raw", s(img), s(&raw)]);
    let dev = open_as(img, fmt);
    assert_eq!(
        dev.virtual_size(),
        std::fs::metadata(&raw).unwrap().len(),
        "virtual size of {}",
        img.display()
    );
    assert_eq!(
        sha256_device(dev.as_ref()),
        sha256_file(&raw),
        "guest bytes of {}",
        img.display()
    );
    std::fs::remove_file(&raw).unwrap();
}

/// Convert with the library.
pub fn convert(src: &Path, dst: &Path, fmt: Format, options: &[(&str, &str)], compress: bool) {
    let mut o = ConvertOptions::new(fmt);
    for (k, v) in options {
        o.create.options.insert(k.to_string(), v.to_string());
    }
    o.create.compress = compress;
    diskconv::convert(src, dst, &o)
        .unwrap_or_else(|e| panic!("convert {} -> {}: {e}", src.display(), dst.display()));
}

/// Assert `qemu-img check` finds no errors and no leaks (formats it can check).
pub fn assert_qemu_check_clean(img: &Path, fmt: Format) {
    let out = Command::new("qemu-img")
        .args(["check", "-f", fmt.name(), "--output=json", s(img)])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "qemu-img check {} failed ({:?}): {text}{}",
        img.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
        for k in ["corruptions", "leaks", "check-errors"] {
            assert_eq!(
                v.get(k).and_then(|x| x.as_u64()).unwrap_or(0),
                0,
                "{k} in {}: {text}",
                img.display()
            );
        }
    }
}

/// Assert `qemu-img compare` says the two images hold identical guest content.
pub fn assert_qemu_identical(a: &Path, fa: Format, b: &Path, fb: Format) {
    qemu_img(&["compare", "-f", fa.name(), "-F", fb.name(), s(a), s(b)]);
}

/// qemu-img info --output=json as a value.
pub fn qemu_info(img: &Path, fmt: Format) -> serde_json::Value {
    serde_json::from_str(&qemu_img(&[
        "info",
        "-f",
        fmt.name(),
        "--output=json",
        s(img),
    ]))
    .unwrap()
}

/// The corpus of real images kept in the repository (tests/data/corpus: README.md says
/// where each came from, MANIFEST.tsv what it must read as). Always there in a clone, so
/// corpus tests never skip; the `.bz2` files need bzip2 (see [`have_bzip2`]).
pub fn corpus_dir() -> Option<PathBuf> {
    let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/corpus");
    assert!(
        d.join("MANIFEST.tsv").exists(),
        "{} missing: the corpus is part of the repository",
        d.display()
    );
    have_bzip2().then_some(d)
}

/// One MANIFEST.tsv row.
#[derive(Debug, Clone)]
pub struct CorpusEntry {
    pub file: String,
    pub format: String,
    pub virtual_size: Option<u64>,
    pub sha256_raw: String,
}

impl CorpusEntry {
    /// The expected guest sha256, or None for images qemu-img fails to open.
    pub fn expected_sha(&self) -> Option<&str> {
        (!self.sha256_raw.starts_with("qemu-img-fails")).then_some(self.sha256_raw.as_str())
    }
}

/// The corpus rows.
pub fn corpus_entries(dir: &Path) -> Vec<CorpusEntry> {
    let text = std::fs::read_to_string(dir.join("MANIFEST.tsv")).unwrap();
    text.lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let c: Vec<&str> = l.split('\t').collect();
            CorpusEntry {
                file: c[0].to_string(),
                format: c[4].to_string(),
                virtual_size: c[5].parse().ok(),
                sha256_raw: c[7].to_string(),
            }
        })
        .collect()
}

/// A usable path to corpus file `name`, decompressing `.bz2` into `tmp`.
pub fn corpus_file(dir: &Path, name: &str, tmp: &Path) -> PathBuf {
    let src = dir.join(name);
    if let Some(stem) = name.strip_suffix(".bz2") {
        let out = tmp.join(stem);
        let o = Command::new("bzip2")
            .args(["-dc", s(&src)])
            .output()
            .unwrap_or_else(|e| panic!("bzip2 ({INSTALL_HINT}): {e}"));
        assert!(
            o.status.success(),
            "bzip2 -dc {}: {:?}",
            src.display(),
            o.status
        );
        std::fs::write(&out, o.stdout).unwrap();
        out
    } else {
        src
    }
}

// ---------------------------------------------------------------------------------------
// Work counters. Tests bound what an input may cost by the work done (bytes and read calls
// from /proc's per-thread I/O accounting, bytes allocated by a counting allocator), never
// by wall-clock time, which swings with the machine's load; a wall-clock limit of minutes
// stays only as a hang guard.

/// How long any one bounded step may run before the test process is aborted as hung: far
/// above any honest run, so load on the machine never trips it.
pub const HANG_GUARD: std::time::Duration = std::time::Duration::from_secs(300);

/// Host I/O done: bytes returned by read/pread calls and the number of such calls
/// (`rchar`/`syscr` of /proc/<pid>/io).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Io {
    /// Bytes read from files (and pipes) by read-family calls.
    pub bytes_read: u64,
    /// Read-family system calls made.
    pub reads: u64,
}

impl Io {
    fn parse(text: &str) -> Io {
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or_else(|| panic!("no {name} in /proc io accounting: {text}"))
        };
        Io {
            bytes_read: field("rchar:"),
            reads: field("syscr:"),
        }
    }

    fn read(path: &str) -> Io {
        Io::parse(&std::fs::read_to_string(path).unwrap_or_else(|e| {
            panic!("{path}: {e} (the work counters need Linux task I/O accounting)")
        }))
    }

    /// I/O done so far by the calling thread (not its other threads: tests run in parallel).
    pub fn this_thread() -> Io {
        Io::read("/proc/thread-self/io")
    }

    fn since(self, start: Io) -> Io {
        Io {
            bytes_read: self.bytes_read - start.bytes_read,
            reads: self.reads - start.reads,
        }
    }
}

/// The work one step did on the calling thread.
#[derive(Clone, Copy, Debug, Default)]
pub struct Work {
    /// Host bytes read and read calls made.
    pub io: Io,
    /// Bytes allocated in all (freed or not).
    pub allocated: u64,
    /// Most bytes live at once above what was live when the step started.
    pub peak_heap: u64,
}

/// Run `f` on this thread, counting the work it does; aborts the process as hung after
/// [`HANG_GUARD`]. Only work done on the calling thread is counted, so `f` should be a
/// single-threaded step (open, map, read), not a multi-threaded conversion.
pub fn measure<T>(what: &str, f: impl FnOnce() -> T) -> (T, Work) {
    let _guard = hang_guard(what);
    let (live0, total0) = alloc_counter::start_peak();
    let io0 = Io::this_thread();
    let out = f();
    let io = Io::this_thread().since(io0);
    let (peak, total) = alloc_counter::now();
    (
        out,
        Work {
            io,
            allocated: total - total0,
            peak_heap: (peak - live0).max(0) as u64,
        },
    )
}

/// What refusing (or opening and inspecting) a hostile file may cost, in bytes read and in
/// peak heap: a few passes over the file, at most 15 MiB, plus 1 MiB. Honest runs read
/// well under 1 MiB (metadata only); a reader that allocates or reads what a header claims
/// (the tables in these tests are over the 32 MiB caps) or loops over the same bytes
/// blows through it at once.
pub fn small_file_budget(path: &Path) -> u64 {
    let len = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    (4 * len).min(15 << 20) + (1 << 20)
}

/// Run `f` (a single-threaded step on the small file `path`) and assert it stays within
/// [`small_file_budget`] in bytes read and in peak heap.
#[track_caller]
pub fn within_small_file_budget<T>(what: &str, path: &Path, f: impl FnOnce() -> T) -> T {
    let (out, w) = measure(what, f);
    let b = small_file_budget(path);
    assert_work_within(what, &w, b, b);
    out
}

/// Assert a step's work stays within bounds, naming what ran and what it cost.
#[track_caller]
pub fn assert_work_within(what: &str, w: &Work, max_bytes_read: u64, max_heap: u64) {
    if std::env::var_os("DISKCONV_PRINT_WORK").is_some() {
        eprintln!("WORK {what}: {w:?} (limits {max_bytes_read} read, {max_heap} heap)");
    }
    assert!(
        w.io.bytes_read <= max_bytes_read && w.peak_heap <= max_heap,
        "{what}: read {} bytes in {} calls (limit {max_bytes_read}), peak heap {} bytes \
         (limit {max_heap}), {} bytes allocated in all",
        w.io.bytes_read,
        w.io.reads,
        w.peak_heap,
        w.allocated
    );
}

/// Aborts the test process when dropped later than [`HANG_GUARD`] after creation: a hung
/// test must fail the run, not stall it, and a hung thread cannot be stopped any other way.
pub struct HangGuard {
    _done: std::sync::mpsc::Sender<()>,
}

/// Start a [`HangGuard`] for `what`.
pub fn hang_guard(what: &str) -> HangGuard {
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let what = what.to_string();
    std::thread::spawn(move || {
        if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(HANG_GUARD) {
            eprintln!("{what}: still running after {HANG_GUARD:?}: hung, aborting");
            std::process::abort();
        }
    });
    HangGuard { _done: tx }
}

/// Run `cmd` (stdout and stderr piped) to completion and return its output with the host
/// I/O of the child and every descendant it waited for (the kernel adds a reaped child's
/// counts to its parent's). The child is killed after [`HANG_GUARD`].
pub fn output_with_io(cmd: &mut Command) -> (std::process::Output, Io) {
    use std::process::Stdio;
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let pid = child.id();
    let drain = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            if let Some(mut r) = r {
                r.read_to_end(&mut v).unwrap();
            }
            v
        })
    };
    let out_t = drain(
        child
            .stdout
            .take()
            .map(|r| Box::new(r) as Box<dyn Read + Send>),
    );
    let err_t = drain(
        child
            .stderr
            .take()
            .map(|r| Box::new(r) as Box<dyn Read + Send>),
    );
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(HANG_GUARD) {
            // SAFETY: signalling the child we spawned, which is not reaped yet (the
            // waitid below leaves it a zombie), so the pid cannot have been reused.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
    });
    // Wait for the exit but leave the child a zombie, whose /proc io still holds its counts.
    // SAFETY: waitid writes only the siginfo we pass.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::waitid(libc::P_PID, pid, &mut info, libc::WEXITED | libc::WNOWAIT) };
    assert_eq!(rc, 0, "waitid: {}", std::io::Error::last_os_error());
    drop(tx);
    let io = Io::read(&format!("/proc/{pid}/io"));
    let status = child.wait().unwrap();
    let output = std::process::Output {
        status,
        stdout: out_t.join().unwrap(),
        stderr: err_t.join().unwrap(),
    };
    (output, io)
}

/// A global allocator that counts, per thread, the bytes allocated and the bytes live, so
/// [`measure`] can bound what a step allocates (a reader must not allocate what a hostile
/// header claims).
mod alloc_counter {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    struct Counting;

    thread_local! {
        /// (bytes allocated in all, bytes live, most bytes live since start_peak).
        static COUNTS: Cell<(u64, i64, i64)> = const { Cell::new((0, 0, 0)) };
    }

    fn add(n: usize) {
        let _ = COUNTS.try_with(|c| {
            let (total, live, peak) = c.get();
            let live = live + n as i64;
            c.set((total + n as u64, live, peak.max(live)));
        });
    }

    fn sub(n: usize) {
        let _ = COUNTS.try_with(|c| {
            let (total, live, peak) = c.get();
            c.set((total, live - n as i64, peak));
        });
    }

    // SAFETY: every call is forwarded to the system allocator unchanged.
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, l: Layout) -> *mut u8 {
            add(l.size());
            System.alloc(l)
        }
        unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
            add(l.size());
            System.alloc_zeroed(l)
        }
        unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
            sub(l.size());
            System.dealloc(p, l)
        }
        unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
            add(new);
            sub(l.size());
            System.realloc(p, l, new)
        }
    }

    #[global_allocator]
    static COUNTING: Counting = Counting;

    /// Start a peak measurement; returns (bytes live now, bytes allocated so far). Live
    /// counts may be negative: a thread may free what another allocated.
    pub fn start_peak() -> (i64, u64) {
        COUNTS.with(|c| {
            let (total, live, _) = c.get();
            c.set((total, live, live));
            (live, total)
        })
    }

    /// (most bytes live since start_peak, bytes allocated so far).
    pub fn now() -> (i64, u64) {
        COUNTS.with(|c| {
            let (total, _, peak) = c.get();
            (peak, total)
        })
    }
}

/// Peak RSS (VmHWM, KiB) of a child, sampled from /proc until it exits, and its exit
/// status: the figure only rises, so the last sample is its peak but for the final 50 ms.
/// Not wait4's ru_maxrss: it counts the test process's own RSS, whose address space a
/// vfork'ed child starts in, and a test binary holding many modules is large.
pub fn peak_rss_kib(mut child: std::process::Child) -> (std::process::ExitStatus, u64) {
    let status = format!("/proc/{}/status", child.id());
    let mut peak = 0;
    loop {
        if let Ok(text) = std::fs::read_to_string(&status) {
            if let Some(kib) = text
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok())
            {
                peak = peak.max(kib);
            }
        }
        if let Some(st) = child.try_wait().unwrap() {
            return (st, peak);
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// `diskconv check -f FMT --output=json EXTRA IMG` (extra: `-r all`, `--allow-references`,
/// ...): the exit code, the JSON report (None when it printed none) and stderr.
pub fn our_check_with(
    img: &Path,
    fmt: &str,
    extra: &[&str],
) -> (i32, Option<serde_json::Value>, String) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_diskconv"));
    c.args(["check", "-f", fmt, "--output=json"]);
    c.args(extra);
    let o = c.arg(img).output().unwrap();
    let v = serde_json::from_slice(&o.stdout).ok();
    (
        o.status.code().unwrap(),
        v,
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}
