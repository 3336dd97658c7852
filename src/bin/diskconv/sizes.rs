//! Sizes on the command line: qemu-img's `cvtnum` and its `-S` rule, plain size flags, and
//! sizes printed the way qemu-img prints them.

use diskconv::{parse_size, Error, Result};

/// qemu-img's `cvtnum`: a size with an optional suffix, 0 up to i64::MAX, and its two
/// messages.
pub fn cvtnum(name: &str, arg: &str) -> Result<u64> {
    let range = || {
        Error::arg(format!(
            "Invalid {name} specified. Must be between 0 and {}.",
            i64::MAX
        ))
    };
    if let Some(rest) = arg.trim_start().strip_prefix('-') {
        return Err(if parse_size(rest).is_ok() {
            range()
        } else {
            Error::arg(format!("Invalid {name} specified: '{arg}'."))
        });
    }
    match parse_size(arg) {
        Ok(v) if v > i64::MAX as u64 => Err(range()),
        Ok(v) => Ok(v),
        Err(_) => Err(Error::arg(format!("Invalid {name} specified: '{arg}'."))),
    }
}

/// Largest `-S` qemu-img accepts: its 16 MiB copy buffer.
const MAX_SPARSE_SIZE: u64 = 32768 * 512;

/// `-S` as qemu-img checks it: a multiple of 512 up to 16 MiB, or 0.
pub fn sparse_size_arg(arg: &str) -> Result<u64> {
    let v = cvtnum("buffer size for sparse output", arg)?;
    if v % 512 != 0 || v > MAX_SPARSE_SIZE {
        return Err(Error::arg(format!(
            "Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 up to {MAX_SPARSE_SIZE}. Select 0 to disable sparse detection (fully allocates output)."
        )));
    }
    Ok(v)
}

/// A byte count flag (suffixes k, M, G, ...) of diskconv's own, named in its error.
pub fn size_arg(flag: &str, v: &str) -> Result<u64> {
    parse_size(v).map_err(|_| Error::arg(format!("{flag}: '{v}' is not a size")))
}

/// Sizes the way qemu-img prints them: "1 GiB", "2.44 GiB", "512 B".
pub fn human_size(n: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < UNITS.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    let s = if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    };
    let s = if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    };
    format!("{s} {}", UNITS[i])
}

#[cfg(test)]
mod tests {
    use super::human_size;

    #[test]
    fn sizes_print_like_qemu() {
        assert_eq!(human_size(1 << 30), "1 GiB");
        assert_eq!(human_size(512), "512 B");
        assert_eq!(human_size(104857600), "100 MiB");
        assert_eq!(human_size(2621440000), "2.44 GiB");
    }
}
