//! LVM2 physical volumes: the label, the metadata area's volume-group text, and the
//! linear logical volumes it describes, each scanned like a partition through a small
//! [`BlockDevice`] over its extents.
//!
//! On-disk format (lvm2's lib/format_text/layout.h and lib/label/label.h):
//! - a 512-byte label in one of sectors 0-3: "LABELONE", its sector (u64), a CRC (u32)
//!   over bytes 20..512, the offset of the PV header (u32), "LVM2 001";
//! - the PV header: uuid (32 chars), device size (u64), then two zero-terminated lists of
//!   (offset, size) u64 pairs: the data areas, then the metadata areas;
//! - each metadata area starts with a 512-byte header: CRC (u32) over bytes 4..512, the
//!   magic " LVM2 x[5A%r0N*>", version 1, start and size (u64), then raw locations
//!   (offset, size, CRC u32, flags u32), the first being the committed metadata: text in
//!   the area's circular buffer, wrapping to just after the header;
//! - the text: `vgname { extent_size = N  physical_volumes { pv0 { id pe_start pe_count } }
//!   logical_volumes { lv { status segment1 { start_extent extent_count type
//!   stripe_count stripes = ["pv0", pe] } } } }`, sizes in 512-byte sectors.
//!
//! lvm2's CRC is the reflected CRC-32 polynomial from the initial value 0xf597a6cf with no
//! final inversion: crc32fast with the initial state and result inverted.
//!
//! Only linear volumes (every segment "striped" with one stripe, all on this PV) are
//! scanned; anything else (striped, thin, snapshots and their origins, mirrors, raid, a
//! volume on another PV) is reported skipped, and its extents stay as they are.

use std::collections::BTreeMap;

use super::scan::{scan_region, PartitionReport};
use super::{FreeMap, Region};
use crate::device::{check_guest_range, map_end, BlockDevice, ImageInfo, Mapping, MappingKind};
use crate::error::{Error, Result};
use crate::format::Format;

/// The label's first bytes.
pub const LABEL_ID: &[u8; 8] = b"LABELONE";
/// The label type of an LVM2 PV.
pub const LABEL_TYPE: &[u8; 8] = b"LVM2 001";
/// The metadata area header's magic.
pub const MDA_MAGIC: &[u8; 16] = b" LVM2 x[5A%r0N*>";
/// The metadata area header's size.
pub const MDA_HEADER_SIZE: u64 = 512;
/// lvm2's CRC starting value.
pub const INITIAL_CRC: u32 = 0xf597_a6cf;
/// The most metadata text read.
pub const MAX_TEXT: u64 = 1 << 20;
/// Nesting depth of the metadata text beyond which it is refused.
const MAX_DEPTH: usize = 16;
const SECTOR: u64 = 512;

/// lvm2's `calc_crc(INITIAL_CRC, ...)` over `parts` in turn.
pub fn lvm_crc(parts: &[&[u8]]) -> u32 {
    let mut h = crc32fast::Hasher::new_with_initial(!INITIAL_CRC);
    for p in parts {
        h.update(p);
    }
    !h.finalize()
}

/// A value of the metadata text.
///
/// Closed: LVM2's metadata text grammar has exactly these value kinds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// "quoted"
    Str(String),
    /// A number.
    Int(i64),
    /// [a, b, ...]
    List(Vec<Value>),
    /// name { ... }: keys in text order.
    Section(Vec<(String, Value)>),
}

impl Value {
    fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Section(items) => items.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }
    fn int(&self, key: &str) -> Result<u64> {
        match self.get(key) {
            Some(Value::Int(n)) if *n >= 0 => Ok(*n as u64),
            _ => Err(Error::corrupt(format!(
                "LVM metadata: `{key}` is missing or not a non-negative number"
            ))
            .with_field(key.to_string())),
        }
    }
    fn str(&self, key: &str) -> Option<&str> {
        match self.get(key) {
            Some(Value::Str(s)) => Some(s),
            _ => None,
        }
    }
    fn sections(&self) -> impl Iterator<Item = (&str, &Value)> {
        let items: &[(String, Value)] = match self {
            Value::Section(items) => items,
            _ => &[],
        };
        items
            .iter()
            .filter(|(_, v)| matches!(v, Value::Section(_)))
            .map(|(k, v)| (k.as_str(), v))
    }
    fn strings(&self, out: &mut Vec<String>) {
        match self {
            Value::Str(s) => out.push(s.clone()),
            Value::List(l) => l.iter().for_each(|v| v.strings(out)),
            Value::Section(items) => items.iter().for_each(|(_, v)| v.strings(out)),
            Value::Int(_) => {}
        }
    }
}

/// Parse lvm2's config text (the VG metadata) into a root section.
pub fn parse_text(text: &[u8]) -> Result<Value> {
    let mut p = Parser { s: text, i: 0 };
    let items = p.items(0)?;
    p.skip_ws();
    if p.i < p.s.len() {
        return Err(p.err("unexpected text after the last section"));
    }
    Ok(Value::Section(items))
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn err(&self, what: &str) -> Error {
        Error::corrupt(format!("LVM metadata text at byte {}: {what}", self.i)).at(self.i as u64)
    }
    fn skip_ws(&mut self) {
        while self.i < self.s.len() {
            match self.s[self.i] {
                b' ' | b'\t' | b'\n' | b'\r' | 0 => self.i += 1,
                b'#' => {
                    while self.i < self.s.len() && self.s[self.i] != b'\n' {
                        self.i += 1;
                    }
                }
                _ => break,
            }
        }
    }
    fn peek(&mut self) -> Option<u8> {
        self.skip_ws();
        self.s.get(self.i).copied()
    }
    fn ident(&mut self) -> Result<String> {
        self.skip_ws();
        let start = self.i;
        while self.i < self.s.len()
            && (self.s[self.i].is_ascii_alphanumeric() || b"_.+-".contains(&self.s[self.i]))
        {
            self.i += 1;
        }
        if self.i == start {
            return Err(self.err("expected a name"));
        }
        Ok(String::from_utf8_lossy(&self.s[start..self.i]).into_owned())
    }
    fn items(&mut self, depth: usize) -> Result<Vec<(String, Value)>> {
        if depth > MAX_DEPTH {
            return Err(self.err("sections nested too deep"));
        }
        let mut items = Vec::new();
        loop {
            match self.peek() {
                None if depth == 0 => return Ok(items),
                None => return Err(self.err("unterminated section")),
                Some(b'}') if depth > 0 => {
                    self.i += 1;
                    return Ok(items);
                }
                _ => {}
            }
            let key = self.ident()?;
            match self.peek() {
                Some(b'{') => {
                    self.i += 1;
                    let inner = self.items(depth + 1)?;
                    items.push((key, Value::Section(inner)));
                }
                Some(b'=') => {
                    self.i += 1;
                    let v = self.value(depth)?;
                    items.push((key, v));
                }
                _ => return Err(self.err("expected `=` or `{` after a name")),
            }
        }
    }
    fn value(&mut self, depth: usize) -> Result<Value> {
        match self.peek() {
            Some(b'"') => {
                self.i += 1;
                let mut out = Vec::new();
                loop {
                    match self.s.get(self.i) {
                        None => return Err(self.err("unterminated string")),
                        Some(b'"') => {
                            self.i += 1;
                            break;
                        }
                        Some(b'\\') if self.i + 1 < self.s.len() => {
                            out.push(self.s[self.i + 1]);
                            self.i += 2;
                        }
                        Some(&c) => {
                            out.push(c);
                            self.i += 1;
                        }
                    }
                }
                Ok(Value::Str(String::from_utf8_lossy(&out).into_owned()))
            }
            Some(b'[') => {
                if depth > MAX_DEPTH {
                    return Err(self.err("lists nested too deep"));
                }
                self.i += 1;
                let mut list = Vec::new();
                loop {
                    match self.peek() {
                        Some(b']') => {
                            self.i += 1;
                            return Ok(Value::List(list));
                        }
                        Some(b',') if !list.is_empty() => self.i += 1,
                        _ => list.push(self.value(depth + 1)?),
                    }
                }
            }
            Some(c) if c == b'-' || c.is_ascii_digit() => {
                let start = self.i;
                self.i += 1;
                while self.i < self.s.len()
                    && (self.s[self.i].is_ascii_digit() || self.s[self.i] == b'.')
                {
                    self.i += 1;
                }
                let t = std::str::from_utf8(&self.s[start..self.i]).unwrap_or("");
                // Floats (none in VG metadata) read as 0 rather than failing the parse.
                Ok(Value::Int(t.parse::<i64>().unwrap_or(0)))
            }
            _ => Err(self.err("expected a value")),
        }
    }
}

/// The PV label and header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PvLabel {
    /// Byte offset of the label sector.
    pub label_at: u64,
    /// The PV uuid (32 characters, no dashes).
    pub uuid: String,
    /// Data areas (offset, size) in bytes; size 0 means "to the end".
    pub data_areas: Vec<(u64, u64)>,
    /// Metadata areas (offset, size) in bytes.
    pub metadata_areas: Vec<(u64, u64)>,
}

/// Find and check the label in sectors 0-3. `Ok(None)` when there is none.
pub fn read_label(region: &Region<'_>) -> Result<Option<PvLabel>> {
    if region.len() < 4 * SECTOR {
        return Ok(None);
    }
    let buf = region.read_vec(0, 4 * SECTOR, 4 * SECTOR, "LVM label sectors")?;
    for n in 0..4u64 {
        let s = &buf[(n * SECTOR) as usize..((n + 1) * SECTOR) as usize];
        if &s[0..8] != LABEL_ID {
            continue;
        }
        let at = n * SECTOR;
        let le64 = |b: &[u8]| u64::from_le_bytes(b[..8].try_into().unwrap());
        let le32 = |b: &[u8]| u32::from_le_bytes(b[..4].try_into().unwrap());
        if le64(&s[8..]) != n {
            return Err(Error::corrupt(format!(
                "LVM label in sector {n} says it is in sector {}",
                le64(&s[8..])
            ))
            .with_field("sector_xl")
            .at(at + 8));
        }
        let crc = le32(&s[16..]);
        let computed = lvm_crc(&[&s[20..]]);
        if crc != computed {
            return Err(Error::corrupt(format!(
                "LVM label CRC is {crc:#010x}, its bytes give {computed:#010x}"
            ))
            .with_field("crc_xl")
            .at(at + 16));
        }
        if &s[24..32] != LABEL_TYPE {
            return Err(Error::unsupported(format!(
                "LVM label type {:?} is not \"LVM2 001\"",
                String::from_utf8_lossy(&s[24..32])
            ))
            .at(at + 24));
        }
        let off = le32(&s[20..]) as usize;
        if !(32..=SECTOR as usize - 48).contains(&off) {
            return Err(Error::corrupt(format!(
                "LVM PV header offset {off} is not inside the label sector"
            ))
            .with_field("offset_xl"));
        }
        let h = &s[off..];
        let uuid = String::from_utf8_lossy(&h[..32]).into_owned();
        let mut lists = [Vec::new(), Vec::new()];
        let mut p = 40;
        for list in lists.iter_mut() {
            loop {
                if off + p + 16 > SECTOR as usize {
                    return Err(Error::corrupt(
                        "LVM PV header's area lists run past the label sector",
                    ));
                }
                let (o, l) = (le64(&h[p..]), le64(&h[p + 8..]));
                p += 16;
                if o == 0 {
                    break;
                }
                list.push((o, l));
            }
        }
        let [data_areas, metadata_areas] = lists;
        return Ok(Some(PvLabel {
            label_at: at,
            uuid,
            data_areas,
            metadata_areas,
        }));
    }
    Ok(None)
}

/// Read the committed VG metadata text of the first metadata area that validates.
pub fn read_metadata(region: &Region<'_>, label: &PvLabel) -> Result<Vec<u8>> {
    let mut why = Vec::new();
    for &(at, size) in &label.metadata_areas {
        match read_mda(region, at, size) {
            Ok(t) => return Ok(t),
            Err(e) => why.push(format!("metadata area at {at:#x}: {e}")),
        }
    }
    if why.is_empty() {
        return Err(Error::unsupported(
            "this physical volume holds no metadata area (pvcreate --metadatacopies 0)",
        ));
    }
    Err(Error::corrupt(why.join("; ")))
}

fn read_mda(region: &Region<'_>, at: u64, size: u64) -> Result<Vec<u8>> {
    let h = region.read_vec(
        at,
        MDA_HEADER_SIZE,
        MDA_HEADER_SIZE,
        "LVM metadata area header",
    )?;
    let le64 = |b: &[u8]| u64::from_le_bytes(b[..8].try_into().unwrap());
    let le32 = |b: &[u8]| u32::from_le_bytes(b[..4].try_into().unwrap());
    let crc = le32(&h);
    let computed = lvm_crc(&[&h[4..]]);
    if crc != computed {
        return Err(Error::corrupt(format!(
            "header CRC is {crc:#010x}, its bytes give {computed:#010x}"
        ))
        .with_field("checksum_xl"));
    }
    if &h[4..20] != MDA_MAGIC {
        return Err(Error::corrupt("header magic is wrong").with_field("magic"));
    }
    if le32(&h[20..]) != 1 {
        return Err(Error::unsupported(format!(
            "header version {} is not 1",
            le32(&h[20..])
        )));
    }
    let (start, mda_size) = (le64(&h[24..]), le64(&h[32..]));
    if start != at || mda_size != size || mda_size <= MDA_HEADER_SIZE {
        return Err(Error::corrupt(format!(
            "header says the area is {mda_size} bytes at {start:#x}, the PV header says {size} at {at:#x}"
        )));
    }
    let (off, len, text_crc, flags) = (
        le64(&h[40..]),
        le64(&h[48..]),
        le32(&h[56..]),
        le32(&h[60..]),
    );
    if off == 0 {
        return Err(Error::unsupported(
            "the area holds no volume group (an orphan physical volume)",
        ));
    }
    if flags & 1 != 0 {
        return Err(Error::unsupported("the area is marked ignored"));
    }
    if off < MDA_HEADER_SIZE
        || off >= mda_size
        || len > mda_size - MDA_HEADER_SIZE
        || len > MAX_TEXT
    {
        return Err(Error::corrupt(format!(
            "metadata text of {len} bytes at {off:#x} does not fit the {mda_size}-byte area"
        ))
        .with_field("raw_locn"));
    }
    // The text may wrap from the area's end to just after its header.
    let first = len.min(mda_size - off);
    let mut text = region.read_vec(at + off, first, MAX_TEXT, "LVM metadata text")?;
    if first < len {
        let rest = region.read_vec(
            at + MDA_HEADER_SIZE,
            len - first,
            MAX_TEXT,
            "LVM metadata text",
        )?;
        text.extend_from_slice(&rest);
    }
    let computed = lvm_crc(&[&text]);
    if computed != text_crc {
        return Err(Error::corrupt(format!(
            "metadata text CRC is {text_crc:#010x}, its bytes give {computed:#010x}"
        ))
        .with_field("raw_locn checksum"));
    }
    Ok(text)
}

/// One piece of a logical volume: `len` bytes at `lv_off` of the volume live at
/// `pv_off` of the physical volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Offset in the logical volume.
    pub lv_off: u64,
    /// Offset in the physical volume (relative to its partition).
    pub pv_off: u64,
    /// Length in bytes.
    pub len: u64,
}

/// A logical volume as the metadata says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lv {
    /// "vg/lv".
    pub name: String,
    /// Its size in bytes, from its segments' extent counts.
    pub size: u64,
    /// Its extents on this PV, in volume order, when it is a linear volume wholly on
    /// this PV; otherwise why it is not scanned.
    pub layout: std::result::Result<Vec<Extent>, String>,
}

/// The volume group as far as this PV is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vg {
    /// The VG name.
    pub name: String,
    /// Every logical volume.
    pub lvs: Vec<Lv>,
    /// This PV's extents used by no volume (offset, len relative to the PV), when every
    /// segment in the VG is one whose extents are known; otherwise why none are freed.
    pub unused: std::result::Result<Vec<(u64, u64)>, String>,
}

/// Interpret the VG metadata text for the PV of `uuid` on a partition of `pv_len` bytes.
pub fn read_vg(root: &Value, uuid: &str, pv_len: u64) -> Result<Vg> {
    let Some((name, vg)) = root.sections().next() else {
        return Err(Error::corrupt("LVM metadata holds no volume group section"));
    };
    let extent = vg
        .int("extent_size")?
        .checked_mul(SECTOR)
        .filter(|&e| e > 0)
        .ok_or_else(|| Error::corrupt("LVM extent_size is zero or too large"))?;
    let pvs = vg
        .get("physical_volumes")
        .ok_or_else(|| Error::corrupt("LVM metadata has no physical_volumes"))?;
    let want: String = uuid.chars().filter(|&c| c != '-').collect();
    let mut this = None;
    for (pv_name, pv) in pvs.sections() {
        let id: String = pv
            .str("id")
            .unwrap_or("")
            .chars()
            .filter(|&c| c != '-')
            .collect();
        if id == want {
            this = Some((pv_name.to_string(), pv));
        }
    }
    let Some((pv_name, pv)) = this else {
        return Err(Error::corrupt(format!(
            "the volume group's metadata does not list this physical volume ({uuid})"
        )));
    };
    let pe_start = pv
        .int("pe_start")?
        .checked_mul(SECTOR)
        .ok_or_else(|| Error::corrupt("LVM pe_start too large"))?;
    let pe_count = pv.int("pe_count")?;
    let data_end = pe_count
        .checked_mul(extent)
        .and_then(|n| n.checked_add(pe_start))
        .filter(|&e| e <= pv_len)
        .ok_or_else(|| {
            Error::corrupt(format!(
                "{pe_count} extents of {extent} bytes from {pe_start:#x} run past the \
                 physical volume ({pv_len} bytes)"
            ))
            .with_field("pe_count")
        })?;
    let _ = data_end;
    let lvs_sec = vg.get("logical_volumes");
    let lv_list: Vec<(&str, &Value)> = lvs_sec.map(|s| s.sections().collect()).unwrap_or_default();
    // Names used by another volume's segments: snapshot origins and cow stores, pool
    // data and metadata, mirror and raid images. Their content is not a filesystem of
    // its own, or is shared, so none is scanned.
    let mut referenced: BTreeMap<String, String> = BTreeMap::new();
    for (lv_name, lv) in &lv_list {
        for (_, seg) in lv.sections() {
            let mut names = Vec::new();
            seg.strings(&mut names);
            for n in names {
                if n != *lv_name && lv_list.iter().any(|(o, _)| *o == n) {
                    referenced.entry(n).or_insert_with(|| lv_name.to_string());
                }
            }
        }
    }
    let mut used: Vec<(u64, u64)> = Vec::new();
    let mut all_known = Ok(());
    let mut lvs = Vec::new();
    for (lv_name, lv) in &lv_list {
        let mut segs: Vec<&Value> = lv.sections().map(|(_, s)| s).collect();
        let mut layout: std::result::Result<Vec<Extent>, String> = Ok(Vec::new());
        let status = {
            let mut s = Vec::new();
            if let Some(v) = lv.get("status") {
                v.strings(&mut s);
            }
            s
        };
        let start_of = |s: &Value| s.int("start_extent").unwrap_or(u64::MAX);
        segs.sort_by_key(|s| start_of(s));
        let mut next = 0u64;
        let mut size = 0u64;
        for seg in &segs {
            let kind = seg.str("type").unwrap_or("");
            let (start, count) = (seg.int("start_extent")?, seg.int("extent_count")?);
            size = size.saturating_add(count.saturating_mul(extent));
            if kind != "striped" {
                if all_known.is_ok() {
                    all_known = Err(format!(
                        "free extents kept: {name}/{lv_name} has a segment of type {kind:?}"
                    ));
                }
                if layout.is_ok() {
                    layout = Err(format!("segment type {kind:?} is not linear"));
                }
                continue;
            }
            let stripes = match seg.get("stripes") {
                Some(Value::List(l)) => l,
                _ => {
                    return Err(Error::corrupt(format!(
                        "{name}/{lv_name}: segment has no stripes"
                    )))
                }
            };
            let stripe_count = seg.int("stripe_count")?;
            if stripe_count == 0
                || stripes.len() as u64 != 2 * stripe_count
                || count % stripe_count != 0
            {
                return Err(Error::corrupt(format!(
                    "{name}/{lv_name}: stripe_count {stripe_count} disagrees with its {} stripe values or {count} extents",
                    stripes.len()
                )));
            }
            let per = count / stripe_count;
            for pair in stripes.chunks(2) {
                let (Value::Str(on), Value::Int(pe)) = (&pair[0], &pair[1]) else {
                    return Err(Error::corrupt(format!(
                        "{name}/{lv_name}: a stripe is not (\"pvN\", extent)"
                    )));
                };
                if *on == pv_name {
                    let pe = *pe as u64;
                    if pe.checked_add(per).is_none_or(|e| e > pe_count) {
                        return Err(Error::corrupt(format!(
                            "{name}/{lv_name}: extents {pe}+{per} run past pe_count {pe_count}"
                        )));
                    }
                    used.push((pe, per));
                }
            }
            if layout.is_ok() {
                if stripe_count != 1 {
                    layout = Err(format!("striped over {stripe_count} stripes, not linear"));
                } else if let (Value::Str(on), Value::Int(pe)) = (&stripes[0], &stripes[1]) {
                    if *on != pv_name {
                        layout = Err(format!("has extents on another physical volume ({on})"));
                    } else if start != next {
                        layout = Err(format!("segments leave a gap at extent {next}"));
                    } else if let Ok(v) = layout.as_mut() {
                        v.push(Extent {
                            lv_off: start * extent,
                            pv_off: pe_start + *pe as u64 * extent,
                            len: count * extent,
                        });
                    }
                }
            }
            next = start.saturating_add(count);
        }
        if layout.is_ok() {
            if let Some(by) = referenced.get(*lv_name) {
                layout = Err(format!("used by {by} (snapshot, pool, mirror or raid)"));
            } else if !status.iter().any(|s| s == "VISIBLE") {
                layout = Err("hidden volume".to_string());
            } else if segs.is_empty() {
                layout = Err("no segments".to_string());
            }
        }
        lvs.push(Lv {
            name: format!("{name}/{lv_name}"),
            size,
            layout,
        });
    }
    let unused = all_known.map(|()| {
        let mut bits = vec![false; pe_count.min(1 << 24) as usize];
        for (pe, n) in &used {
            for i in *pe..(*pe + *n).min(bits.len() as u64) {
                bits[i as usize] = true;
            }
        }
        let mut runs = Vec::new();
        let mut i = 0usize;
        while i < bits.len() {
            if bits[i] {
                i += 1;
                continue;
            }
            let s = i;
            while i < bits.len() && !bits[i] {
                i += 1;
            }
            runs.push((pe_start + s as u64 * extent, (i - s) as u64 * extent));
        }
        runs
    });
    Ok(Vg {
        name: name.to_string(),
        lvs,
        unused,
    })
}

/// A logical volume read through its extents on the PV.
pub struct LvDevice<'a> {
    pv: Region<'a>,
    extents: Vec<Extent>,
    size: u64,
}

impl<'a> LvDevice<'a> {
    /// The volume of `extents` (in volume order, contiguous from 0) on `pv`.
    pub fn new(pv: Region<'a>, extents: Vec<Extent>) -> Result<Self> {
        let mut size = 0;
        for e in &extents {
            if e.lv_off != size || e.pv_off.checked_add(e.len).is_none_or(|x| x > pv.len()) {
                return Err(Error::corrupt(
                    "logical volume extents are not contiguous or run past the physical volume",
                ));
            }
            size += e.len;
        }
        Ok(LvDevice { pv, extents, size })
    }

    fn find(&self, off: u64) -> &Extent {
        let i = self.extents.partition_point(|e| e.lv_off + e.len <= off);
        &self.extents[i]
    }

    /// Volume ranges as (offset relative to the PV, len) pieces.
    pub fn to_pv(&self, mut off: u64, len: u64) -> Vec<(u64, u64)> {
        let end = (off + len).min(self.size);
        let mut out = Vec::new();
        while off < end {
            let e = self.find(off);
            let n = (e.lv_off + e.len).min(end) - off;
            out.push((e.pv_off + off - e.lv_off, n));
            off += n;
        }
        out
    }
}

impl BlockDevice for LvDevice<'_> {
    fn virtual_size(&self) -> u64 {
        self.size
    }
    fn map(&self, offset: u64, max_len: u64) -> Result<Mapping> {
        let end = map_end(self.size, offset, max_len)?;
        let e = self.find(offset);
        Ok(Mapping {
            offset,
            len: (e.lv_off + e.len).min(end) - offset,
            kind: MappingKind::Data { host: None },
        })
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_guest_range(self.size, offset, buf.len())?;
        let mut done = 0usize;
        for (at, n) in self.to_pv(offset, buf.len() as u64) {
            self.pv
                .read_at(&mut buf[done..done + n as usize], at, "logical volume data")?;
            done += n as usize;
        }
        Ok(())
    }
    fn info(&self) -> ImageInfo {
        ImageInfo::default()
    }
    fn format(&self) -> Format {
        Format::Raw
    }
}

/// Scan `region` as an LVM2 PV. `None` when it has no LVM label (the caller tries the
/// filesystems); otherwise the PV's report, then one per logical volume.
pub fn scan_pv(
    map: &mut FreeMap,
    region: Region<'_>,
    location: &str,
) -> Option<Vec<PartitionReport>> {
    let mut pv_report = PartitionReport {
        location: location.to_string(),
        offset: region.start(),
        size: region.len(),
        filesystem: Some("LVM2_member".to_string()),
        free_bytes: 0,
        skipped: None,
    };
    let label = match read_label(&region) {
        Ok(None) => return None,
        Ok(Some(l)) => l,
        Err(e) => {
            pv_report.skipped = Some(e.to_string());
            return Some(vec![pv_report]);
        }
    };
    let vg = read_metadata(&region, &label)
        .and_then(|t| parse_text(&t))
        .and_then(|root| read_vg(&root, &label.uuid, region.len()));
    let vg = match vg {
        Ok(vg) => vg,
        Err(e) => {
            pv_report.skipped = Some(e.to_string());
            return Some(vec![pv_report]);
        }
    };
    let mut reports = Vec::new();
    match &vg.unused {
        Ok(runs) => {
            for &(o, l) in runs {
                pv_report.free_bytes += map.mark_free(region.start() + o, l);
            }
        }
        Err(why) => pv_report.skipped = Some(why.clone()),
    }
    for lv in &vg.lvs {
        let loc = format!("lvm {}", lv.name);
        let extents = match &lv.layout {
            Ok(x) => x.clone(),
            Err(why) => {
                reports.push(PartitionReport {
                    location: loc,
                    offset: region.start(),
                    size: lv.size,
                    filesystem: None,
                    free_bytes: 0,
                    skipped: Some(why.clone()),
                });
                continue;
            }
        };
        let first = region.start() + extents[0].pv_off;
        let dev = match LvDevice::new(region, extents) {
            Ok(d) => d,
            Err(e) => {
                reports.push(PartitionReport {
                    location: loc,
                    offset: first,
                    size: lv.size,
                    filesystem: None,
                    free_bytes: 0,
                    skipped: Some(e.to_string()),
                });
                continue;
            }
        };
        let mut lv_map = FreeMap::new(dev.virtual_size());
        let mut r = scan_region(&mut lv_map, Region::whole(&dev), &loc);
        r.offset = first;
        r.free_bytes = 0;
        for (o, l) in lv_map.runs() {
            for (po, pl) in dev.to_pv(o, l) {
                r.free_bytes += map.mark_free(region.start() + po, pl);
            }
        }
        reports.push(r);
    }
    reports.insert(0, pv_report);
    Some(reports)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"vg0 {
id = "abc"
seqno = 3
extent_size = 8   # 4 KiB
physical_volumes {
pv0 {
id = "AAAA-BB"
pe_start = 8
pe_count = 20
}
}
logical_volumes {
root {
status = ["READ", "WRITE", "VISIBLE"]
segment_count = 2
segment2 {
start_extent = 4
extent_count = 2
type = "striped"
stripe_count = 1
stripes = ["pv0", 10]
}
segment1 {
start_extent = 0
extent_count = 4
type = "striped"
stripe_count = 1	# linear
stripes = [
"pv0", 0
]
}
}
snap {
status = ["VISIBLE"]
segment1 {
start_extent = 0
extent_count = 1
type = "snapshot"
origin = "root"
}
}
}
}
contents = "Text Format Volume Group"
version = 1
"#;

    #[test]
    fn crc_matches_lvm2() {
        // lvm2's calc_crc over no bytes is its initial value.
        assert_eq!(lvm_crc(&[]), INITIAL_CRC);
        assert_eq!(lvm_crc(&[b"ab", b"c"]), lvm_crc(&[b"abc"]));
    }

    #[test]
    fn text_parses_and_maps_linear_volumes() {
        let root = parse_text(TEXT.as_bytes()).unwrap();
        let vg = read_vg(&root, "AAAABB", 1 << 20).unwrap();
        assert_eq!(vg.name, "vg0");
        let root_lv = &vg.lvs[0];
        // Used by the snapshot as its origin: never scanned.
        assert!(root_lv.layout.as_ref().unwrap_err().contains("snap"));
        assert!(
            vg.unused.is_err(),
            "a snapshot segment's extents are not known"
        );
        let no_snap = TEXT.replace("origin = \"root\"", "").replace(
            "\"snapshot\"",
            "\"striped\"\nstripe_count = 1\nstripes = [\"pv0\", 19]",
        );
        let vg = read_vg(&parse_text(no_snap.as_bytes()).unwrap(), "AAAABB", 1 << 20).unwrap();
        let x = vg.lvs[0].layout.as_ref().unwrap();
        assert_eq!(
            x,
            &vec![
                Extent {
                    lv_off: 0,
                    pv_off: 4096,
                    len: 4 * 4096
                },
                Extent {
                    lv_off: 4 * 4096,
                    pv_off: 4096 + 10 * 4096,
                    len: 2 * 4096
                },
            ]
        );
        let unused = vg.unused.unwrap();
        assert_eq!(
            unused,
            vec![(4096 + 4 * 4096, 6 * 4096), (4096 + 12 * 4096, 7 * 4096)]
        );
    }

    #[test]
    fn hostile_text_is_refused() {
        assert!(parse_text(b"a { b = ").is_err());
        assert!(parse_text("x{".repeat(100).as_bytes()).is_err());
        assert!(parse_text(b"a { b = \"unterminated }").is_err());
        let root =
            parse_text(TEXT.replace("pe_count = 20", "pe_count = 99999").as_bytes()).unwrap();
        assert!(read_vg(&root, "AAAABB", 1 << 20).is_err());
        let root = parse_text(TEXT.as_bytes()).unwrap();
        assert!(read_vg(&root, "OTHER", 1 << 20).is_err());
    }
}
