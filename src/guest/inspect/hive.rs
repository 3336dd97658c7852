//! A small reader of Windows registry hives (the regf format): enough to read a few
//! values under a key path, as Windows inspection needs from SOFTWARE and SYSTEM.
//!
//! Every cell offset is checked against the hive's bins, every count against the cell
//! that holds it, subkey-list indirection (`ri`) is followed one level only, and key
//! names compare case-insensitively as Windows does. A hive that does not validate is
//! an error naming the field; big-data values (`db`, over 16 KiB) are refused by name.

use crate::error::{Error, Result};

/// The base block is 4096 bytes; cell offsets count from its end.
const BASE: usize = 4096;
/// The most subkeys or values one key may list.
const MAX_LIST: usize = 1 << 16;

/// A registry value, as far as inspection reads it.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// REG_SZ or REG_EXPAND_SZ, without its terminating NUL.
    Str(String),
    /// REG_DWORD.
    Dword(u32),
    /// REG_QWORD.
    Qword(u64),
    /// Any other type (its number), not decoded.
    Other(u32),
}

/// A hive held in memory.
pub struct Hive {
    data: Vec<u8>,
    root: usize,
}

fn le16(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"))
}

fn bad(what: &str, at: usize) -> Error {
    Error::corrupt(format!("registry hive: {what} at cell offset {at:#x}"))
}

impl Hive {
    /// Check the base block ("regf", checksum, root cell) of `data`.
    pub fn parse(data: Vec<u8>) -> Result<Hive> {
        if data.len() < BASE + 32 || &data[0..4] != b"regf" {
            return Err(Error::corrupt("registry hive: no regf signature").with_field("signature"));
        }
        let sum = (0..508).step_by(4).fold(0u32, |x, o| x ^ le32(&data, o));
        if sum != le32(&data, 508) {
            return Err(Error::corrupt(format!(
                "registry hive: base block checksum is {:#x}, its bytes give {sum:#x}",
                le32(&data, 508)
            ))
            .with_field("checksum"));
        }
        if le32(&data, 0x14) != 1 {
            return Err(Error::unsupported(format!(
                "registry hive: major version {} is not 1",
                le32(&data, 0x14)
            )));
        }
        let h = Hive {
            root: le32(&data, 0x24) as usize,
            data,
        };
        h.key_cell(h.root)?;
        Ok(h)
    }

    /// The data of the allocated cell at `off` (relative to the first bin).
    fn cell(&self, off: usize) -> Result<&[u8]> {
        let at = BASE
            .checked_add(off)
            .filter(|a| a.checked_add(4).is_some_and(|e| e <= self.data.len()));
        let at = at.ok_or_else(|| bad("cell outside the hive", off))?;
        let size = le32(&self.data, at) as i32;
        if size >= 0 {
            return Err(bad("a free cell where an allocated one is named", off));
        }
        let len = size.unsigned_abs() as usize;
        if len < 8 || at + len > self.data.len() {
            return Err(bad("cell size runs past the hive", off));
        }
        Ok(&self.data[at + 4..at + len])
    }

    fn key_cell(&self, off: usize) -> Result<&[u8]> {
        let c = self.cell(off)?;
        if c.len() < 0x4C || &c[0..2] != b"nk" {
            return Err(bad("not a key node (nk)", off));
        }
        Ok(c)
    }

    fn name(c: &[u8], at: usize, len: usize, ascii: bool, off: usize) -> Result<String> {
        let b = c
            .get(at..at + len)
            .ok_or_else(|| bad("name runs past its cell", off))?;
        Ok(if ascii {
            b.iter().map(|&x| x as char).collect()
        } else {
            let u: Vec<u16> = b
                .chunks_exact(2)
                .map(|p| u16::from_le_bytes([p[0], p[1]]))
                .collect();
            String::from_utf16_lossy(&u)
        })
    }

    /// The key cells a subkey list at `off` names (lf, lh, li; ri one level).
    fn subkeys(&self, off: usize, depth: u32, out: &mut Vec<usize>) -> Result<()> {
        let c = self.cell(off)?;
        if c.len() < 4 {
            return Err(bad("subkey list too short", off));
        }
        let n = le16(c, 2) as usize;
        let (step, kind) = match &c[0..2] {
            b"lf" | b"lh" => (8, 0),
            b"li" => (4, 0),
            b"ri" if depth == 0 => (4, 1),
            _ => return Err(bad("not a subkey list (lf, lh, li, ri)", off)),
        };
        if 4 + n * step > c.len() || out.len() + n > MAX_LIST {
            return Err(bad("subkey count runs past its list", off));
        }
        for i in 0..n {
            let o = le32(c, 4 + i * step) as usize;
            if kind == 1 {
                self.subkeys(o, depth + 1, out)?;
            } else {
                out.push(o);
            }
        }
        Ok(())
    }

    /// The key cell of the subkey `name` of the key at `off`.
    fn child(&self, off: usize, name: &str) -> Result<Option<usize>> {
        let c = self.key_cell(off)?;
        if le32(c, 0x14) == 0 {
            return Ok(None);
        }
        let mut list = Vec::new();
        self.subkeys(le32(c, 0x1C) as usize, 0, &mut list)?;
        for k in list {
            let kc = self.key_cell(k)?;
            let n = Self::name(
                kc,
                0x4C,
                le16(kc, 0x48) as usize,
                le16(kc, 2) & 0x20 != 0,
                k,
            )?;
            if n.eq_ignore_ascii_case(name) {
                return Ok(Some(k));
            }
        }
        Ok(None)
    }

    /// The value `name` of the key at `path` (components, case-insensitive); `None`
    /// when the key or the value is not there.
    pub fn value(&self, path: &[&str], name: &str) -> Result<Option<Value>> {
        let mut k = self.root;
        for comp in path {
            match self.child(k, comp)? {
                Some(c) => k = c,
                None => return Ok(None),
            }
        }
        let c = self.key_cell(k)?;
        let n = le32(c, 0x24) as usize;
        if n == 0 {
            return Ok(None);
        }
        let list_off = le32(c, 0x28) as usize;
        let list = self.cell(list_off)?;
        if n > MAX_LIST || n * 4 > list.len() {
            return Err(bad("value count runs past its list", list_off));
        }
        for i in 0..n {
            let vo = le32(list, i * 4) as usize;
            let v = self.cell(vo)?;
            if v.len() < 0x14 || &v[0..2] != b"vk" {
                return Err(bad("not a value (vk)", vo));
            }
            let vname = Self::name(v, 0x14, le16(v, 2) as usize, le16(v, 0x10) & 1 != 0, vo)?;
            if vname.eq_ignore_ascii_case(name) {
                return self.decode(v, vo).map(Some);
            }
        }
        Ok(None)
    }

    fn decode(&self, v: &[u8], vo: usize) -> Result<Value> {
        let raw_len = le32(v, 4);
        let kind = le32(v, 0x0C);
        let resident = raw_len & 0x8000_0000 != 0;
        let len = (raw_len & 0x7FFF_FFFF) as usize;
        let bytes: Vec<u8> = if resident {
            v[8..8 + len.min(4)].to_vec()
        } else {
            if len > 16344 {
                return Err(Error::unsupported(format!(
                    "registry hive: value of {len} bytes at cell {vo:#x} is big data (db), not read"
                )));
            }
            let d = self.cell(le32(v, 8) as usize)?;
            d.get(..len)
                .ok_or_else(|| bad("value data runs past its cell", vo))?
                .to_vec()
        };
        Ok(match kind {
            1 | 2 => {
                let u: Vec<u16> = bytes
                    .chunks_exact(2)
                    .map(|p| u16::from_le_bytes([p[0], p[1]]))
                    .collect();
                let end = u.iter().position(|&x| x == 0).unwrap_or(u.len());
                Value::Str(String::from_utf16_lossy(&u[..end]))
            }
            4 if bytes.len() >= 4 => Value::Dword(le32(&bytes, 0)),
            11 if bytes.len() >= 8 => {
                Value::Qword(u64::from_le_bytes(bytes[..8].try_into().expect("8")))
            }
            k => Value::Other(k),
        })
    }

    /// A string value, `None` when absent or of another type.
    pub fn string(&self, path: &[&str], name: &str) -> Result<Option<String>> {
        Ok(match self.value(path, name)? {
            Some(Value::Str(s)) => Some(s),
            _ => None,
        })
    }

    /// A DWORD value, `None` when absent or of another type.
    pub fn dword(&self, path: &[&str], name: &str) -> Result<Option<u32>> {
        Ok(match self.value(path, name)? {
            Some(Value::Dword(d)) => Some(d),
            _ => None,
        })
    }
}
