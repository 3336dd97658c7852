//! The architecture an ELF binary is built for, from its 64-byte header: class, data
//! encoding and `e_machine`, named as libguestfs and libvirt name them.

/// The architecture of the ELF header in `head`, or `None` when it is not ELF or its
/// machine is not one named here.
pub fn arch(head: &[u8]) -> Option<&'static str> {
    if head.len() < 20 || &head[0..4] != b"\x7fELF" {
        return None;
    }
    let wide = match head[4] {
        1 => false,
        2 => true,
        _ => return None,
    };
    let little = match head[5] {
        1 => true,
        2 => false,
        _ => return None,
    };
    let machine = if little {
        u16::from_le_bytes([head[18], head[19]])
    } else {
        u16::from_be_bytes([head[18], head[19]])
    };
    Some(match (machine, wide, little) {
        (3, false, _) => "i686",
        (62, true, _) => "x86_64",
        (40, false, _) => "armv7l",
        (183, true, _) => "aarch64",
        (20, false, _) => "ppc",
        (21, true, true) => "ppc64le",
        (21, true, false) => "ppc64",
        (22, true, _) => "s390x",
        (22, false, _) => "s390",
        (243, true, _) => "riscv64",
        (243, false, _) => "riscv32",
        (8, false, true) => "mipsel",
        (8, false, false) => "mips",
        (8, true, true) => "mips64el",
        (8, true, false) => "mips64",
        (258, true, _) => "loongarch64",
        (2, _, _) | (43, _, _) => "sparc64",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers() {
        let mut h = [0u8; 64];
        h[..4].copy_from_slice(b"\x7fELF");
        h[4] = 2;
        h[5] = 1;
        h[18] = 62;
        assert_eq!(arch(&h), Some("x86_64"));
        h[18] = 183;
        assert_eq!(arch(&h), Some("aarch64"));
        h[4] = 1;
        h[18] = 3;
        assert_eq!(arch(&h), Some("i686"));
        h[18] = 0xff;
        assert_eq!(arch(&h), None);
        assert_eq!(arch(b"#!/bin/sh\n"), None);
    }
}
