//! How fast a conversion runs: how many workers, and the write-rate limit (`-r`).

/// Workers when the caller leaves it to us: one per core we may run on, plus one per
/// other task running on the machine right now (the `R/T` field of /proc/loadavg, less
/// ourselves), up to three times the cores. With every core free that is one per core;
/// with two busy loops on two cores it is four, because the scheduler shares a core
/// between runnable threads, not processes: one worker per core would leave us a third of
/// the machine beside them, while qemu-img's pool of up to 8 threads takes most of it.
/// Measured on 2 cores with two busy loops running, decompressing pure-Rust zstd: 2.4-2.9 s
/// with 2 workers, 2.1-2.2 s with 4 (qemu-img: 1.9-2.2 s); quiet, 4 workers cost 5% on
/// `-c`, so the extra workers come only with the load.
pub fn default_threads() -> usize {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    let busy = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| others_running(&s))
        .unwrap_or(0);
    cores + busy.min(2 * cores)
}

/// Other running tasks in a /proc/loadavg line (`0.52 0.58 0.59 3/467 12345`: 3 runnable,
/// one of them the reader).
fn others_running(loadavg: &str) -> Option<usize> {
    let field = loadavg.split_whitespace().nth(3)?;
    let running: usize = field.split('/').next()?.parse().ok()?;
    Some(running.saturating_sub(1))
}

/// Keeps the average write rate at or under a limit by sleeping between units.
pub(super) struct RateLimiter {
    rate: u64,
    start: std::time::Instant,
    bytes: u64,
}

impl RateLimiter {
    pub(super) fn new(rate: u64) -> Self {
        RateLimiter {
            rate,
            start: std::time::Instant::now(),
            bytes: 0,
        }
    }

    pub(super) fn wrote(&mut self, n: u64) {
        if self.rate == 0 || n == 0 {
            return;
        }
        self.bytes += n;
        let wait = rate_delay(self.bytes, self.rate, self.start.elapsed());
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
    }
}

/// How long to wait after `bytes` written in `elapsed` so the average stays at or
/// under `rate` bytes per second.
fn rate_delay(bytes: u64, rate: u64, elapsed: std::time::Duration) -> std::time::Duration {
    let due = std::time::Duration::from_secs_f64(bytes as f64 / rate as f64);
    due.saturating_sub(elapsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The runnable count of /proc/loadavg, less the reader; anything else is no count.
    #[test]
    fn loadavg_running_field() {
        assert_eq!(others_running("0.52 0.58 0.59 3/467 12345\n"), Some(2));
        assert_eq!(others_running("0.00 0.01 0.05 1/80 999"), Some(0));
        assert_eq!(others_running("0.00 0.01 0.05 0/80 999"), Some(0));
        assert_eq!(others_running("0.00 0.01"), None);
        assert_eq!(others_running("0.00 0.01 0.05 x/80 999"), None);
        let n = default_threads();
        let cores = std::thread::available_parallelism().unwrap().get();
        assert!(
            (cores..=3 * cores).contains(&n),
            "{n} workers on {cores} cores"
        );
    }

    #[test]
    fn rate_delay_keeps_the_average_under_the_limit() {
        use std::time::Duration;
        assert_eq!(
            rate_delay(2 << 20, 1 << 20, Duration::from_millis(500)),
            Duration::from_millis(1500)
        );
        assert_eq!(
            rate_delay(1 << 20, 1 << 20, Duration::from_secs(3)),
            Duration::ZERO
        );
    }
}
