//! UUIDs for the formats that stamp one on each new image (vhd, vhdx, vdi, vmdk's CID).

/// A fresh random version-4 UUID in RFC 4122 byte order, for the formats that stamp one
/// on each new image. Random bytes from the OS; if /dev/urandom is unreadable, from std's
/// randomly keyed SipHash (uniqueness is all a UUID needs, not secrecy).
pub fn random_uuid_v4() -> [u8; 16] {
    use std::io::Read;
    let mut b = [0u8; 16];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .is_err()
    {
        use std::hash::BuildHasher;
        let s = std::collections::hash_map::RandomState::new();
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let a = s.hash_one((t, std::process::id(), 1u8));
        let c = s.hash_one((t, std::process::id(), 2u8));
        b[..8].copy_from_slice(&a.to_le_bytes());
        b[8..].copy_from_slice(&c.to_le_bytes());
    }
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    b
}
