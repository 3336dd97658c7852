//! The crash sweep of a command that changes an image in place: the real binary run
//! under strace, killed (SIGKILL, as kill -9 or a power cut would stop it) or failed
//! (ENOSPC, EIO) at the Nth call of each kind, for every N until a run completes. What
//! the image must look like afterwards is each sweep's own judgement.

use std::process::{Command, Output};

use super::oracles_required;

/// Is strace here (required under CI)?
#[track_caller]
pub fn have_strace() -> bool {
    let ok = Command::new("strace")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok && oracles_required() {
        panic!("strace is required for the crash tests: apt-get install strace");
    }
    ok
}

/// One faulted run: which call, which fault, at which occurrence.
pub struct Fault<'a> {
    /// The system call (`pwrite64`, `fsync`, ...).
    pub call: &'a str,
    /// strace's inject action: `signal=KILL`, `error=ENOSPC`, `error=EIO`.
    pub fault: &'a str,
    /// The occurrence of `call` that faults (1-based).
    pub n: usize,
}

/// For each of `calls`, each fault and each N from 1: `reset` puts the input back, the
/// diskconv binary runs with `args` and the fault injected, and its exit is checked: a
/// kill ends it by SIGKILL, a failed call with exit 1 (the caller's `judge` sees the
/// output and checks the image). A run that completes ends that call's sweep: every
/// occurrence has been tried; `judge` gets `stopped` false for it. More than `limit`
/// calls fail the test. Returns the number of faulted runs.
pub fn sweep(
    calls: &[&str],
    limit: usize,
    args: &[String],
    mut reset: impl FnMut(),
    mut judge: impl FnMut(&Fault, &Output, bool),
) -> usize {
    let mut runs = 0;
    for &call in calls {
        for fault in ["signal=KILL", "error=ENOSPC", "error=EIO"] {
            for n in 1.. {
                assert!(n < limit, "{call}: more than {limit} calls");
                reset();
                let o = Command::new("strace")
                    .args(["-f", "-qq", "-o", "/dev/null", "-e"])
                    .arg(format!("trace={call}"))
                    .arg("-e")
                    .arg(format!("inject={call}:{fault}:when={n}"))
                    .arg(env!("CARGO_BIN_EXE_diskconv"))
                    .args(args)
                    .output()
                    .unwrap();
                runs += 1;
                let f = Fault { call, fault, n };
                let stopped = !o.status.success();
                if stopped {
                    use std::os::unix::process::ExitStatusExt;
                    let what = format!("{args:?}: {fault} at {call} #{n}");
                    let stderr = String::from_utf8_lossy(&o.stderr);
                    if fault == "signal=KILL" {
                        assert_eq!(o.status.signal(), Some(9), "{what}: {stderr}");
                    } else {
                        assert_eq!(o.status.code(), Some(1), "{what}: {stderr}");
                    }
                }
                judge(&f, &o, stopped);
                if !stopped {
                    break;
                }
            }
        }
    }
    runs
}
