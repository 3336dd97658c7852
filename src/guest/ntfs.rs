//! NTFS: the free clusters are the clear bits of `$Bitmap` (MFT record 6), found through
//! the MFT named by the boot sector.
//!
//! Our own reader rather than the `ntfs` crate: that crate reads `$Bitmap` through its
//! file API, but it brings a proc-macro dependency tree (binrw and friends) and checks
//! none of what deciding "free" needs: that every run lies inside the volume, that the
//! bitmap covers every cluster with initialized bytes, that `$MFT`, `$MFTMirr`,
//! `$LogFile`, `$Bitmap` and `$Boot` are marked used, that `$Volume` is not dirty and that
//! `$LogFile` records a clean shutdown. Those checks need the records and runlists
//! anyway; what is left (fixups, attribute walk, mapping pairs) is a few hundred lines.
//!
//! Clean-shutdown rules follow ntfs-3g (which refuses to mount otherwise): the `$Volume`
//! dirty flag, and `$LogFile` either empty (all 0xff, as mkntfs and ntfs-3g leave it) or
//! holding a restart area whose newest copy has no client in use or the
//! `RESTART_VOLUME_IS_CLEAN` flag (Windows fast startup leaves neither), and no
//! `hiberfil.sys` in the root directory holding a hibernation image ("hibr", "wake").

use super::{FreeSink, Outcome, Region};
use crate::error::Result;

/// Fixups always protect 512-byte strides, whatever the sector size.
const FIXUP_STRIDE: usize = 512;
/// The largest MFT record or restart page we accept.
const MAX_RECORD: u32 = 64 << 10;
/// The largest cluster Windows formats (2 MiB).
const MAX_CLUSTER: u64 = 2 << 20;
/// Bound on runs in one runlist: a fragmented $Bitmap has a handful, never this many.
const MAX_RUNS: usize = 1 << 16;
/// Bitmap bytes read at once.
const CHUNK: u64 = 1 << 20;

const REC_MFT: u64 = 0;
const REC_MFTMIRR: u64 = 1;
const REC_LOGFILE: u64 = 2;
const REC_VOLUME: u64 = 3;
const REC_ROOT: u64 = 5;
const REC_BITMAP: u64 = 6;
const REC_BOOT: u64 = 7;

const AT_ATTRIBUTE_LIST: u32 = 0x20;
const AT_VOLUME_INFORMATION: u32 = 0x70;
const AT_DATA: u32 = 0x80;
const AT_INDEX_ROOT: u32 = 0x90;
const AT_INDEX_ALLOCATION: u32 = 0xa0;
const AT_BITMAP: u32 = 0xb0;
/// The most of the root directory's index read to look for `hiberfil.sys`.
const MAX_ROOT_INDEX: u64 = 64 << 20;
const AT_END: u32 = 0xffff_ffff;

const VOLUME_IS_DIRTY: u16 = 0x0001;
const VOLUME_CHKDSK_UNDERWAY: u16 = 0x4000;
const RESTART_VOLUME_IS_CLEAN: u16 = 0x0002;
const LOGFILE_NO_CLIENT: u16 = 0xffff;

type Check<T> = std::result::Result<T, String>;

fn le16(b: &[u8], off: usize) -> Check<u16> {
    b.get(off..off + 2)
        .map(|s| u16::from_le_bytes([s[0], s[1]]))
        .ok_or_else(|| format!("field at {off:#x} runs past its {}-byte structure", b.len()))
}

fn le32(b: &[u8], off: usize) -> Check<u32> {
    b.get(off..off + 4)
        .map(|s| u32::from_le_bytes(s.try_into().unwrap()))
        .ok_or_else(|| format!("field at {off:#x} runs past its {}-byte structure", b.len()))
}

fn le64(b: &[u8], off: usize) -> Check<u64> {
    b.get(off..off + 8)
        .map(|s| u64::from_le_bytes(s.try_into().unwrap()))
        .ok_or_else(|| format!("field at {off:#x} runs past its {}-byte structure", b.len()))
}

/// The geometry from the boot sector (sector 0 of the volume).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootSector {
    /// Bytes per sector.
    pub sector_size: u32,
    /// Bytes per cluster.
    pub cluster_size: u64,
    /// Sectors in the volume (the backup boot sector lies just after them).
    pub total_sectors: u64,
    /// Clusters in the volume: what `$Bitmap` must cover.
    pub clusters: u64,
    /// First cluster of `$MFT`.
    pub mft_lcn: u64,
    /// First cluster of `$MFTMirr`.
    pub mftmirr_lcn: u64,
    /// Bytes per MFT record.
    pub record_size: u32,
}

impl BootSector {
    /// Parse and validate a boot sector (at least 512 bytes) as ntfs-3g does: OEM id,
    /// power-of-two sizes, the FAT fields that NTFS keeps zero, and the MFT inside the
    /// volume. `None` when the OEM id is not NTFS (not ours); `Err` names the bad field.
    pub fn parse(b: &[u8]) -> Option<Check<Self>> {
        if b.len() < 512 || &b[3..11] != b"NTFS    " {
            return None;
        }
        Some(Self::parse_ntfs(b))
    }

    fn parse_ntfs(b: &[u8]) -> Check<Self> {
        if b[510..512] != [0x55, 0xaa] {
            return Err("boot sector lacks its 0x55aa end marker".into());
        }
        let sector_size = u32::from(le16(b, 0x0b)?);
        if !sector_size.is_power_of_two() || !(256..=4096).contains(&sector_size) {
            return Err(format!(
                "boot sector bytes_per_sector {sector_size} is not a power of two in 256..=4096"
            ));
        }
        let spc_raw = b[0x0d];
        // Above 0x80 the byte is a negative shift: clusters of 2^(256-v) sectors.
        let spc: u64 = match spc_raw {
            1..=0x80 if spc_raw.is_power_of_two() => u64::from(spc_raw),
            0xe1..=0xff => 1u64 << (256 - u32::from(spc_raw)),
            _ => {
                return Err(format!(
                    "boot sector sectors_per_cluster {spc_raw:#x} is not a valid encoding"
                ))
            }
        };
        let cluster_size = spc * u64::from(sector_size);
        if cluster_size > MAX_CLUSTER {
            return Err(format!(
                "cluster size {cluster_size} is larger than the {MAX_CLUSTER} NTFS allows"
            ));
        }
        let zero_fields: [(&str, usize, usize); 6] = [
            ("reserved_sectors", 0x0e, 2),
            ("fats", 0x10, 1),
            ("root_entries", 0x11, 2),
            ("sectors", 0x13, 2),
            ("sectors_per_fat", 0x16, 2),
            ("large_sectors", 0x20, 4),
        ];
        for (name, off, len) in zero_fields {
            if b[off..off + len].iter().any(|&x| x != 0) {
                return Err(format!("boot sector {name} (at {off:#x}) is not zero"));
            }
        }
        let total_sectors = le64(b, 0x28)?;
        let clusters = total_sectors / spc;
        if clusters == 0 {
            return Err(format!(
                "boot sector total_sectors {total_sectors} holds no cluster"
            ));
        }
        let mft_lcn = le64(b, 0x30)?;
        let mftmirr_lcn = le64(b, 0x38)?;
        for (name, lcn) in [("mft_lcn", mft_lcn), ("mftmirr_lcn", mftmirr_lcn)] {
            if lcn == 0 || lcn >= clusters {
                return Err(format!(
                    "boot sector {name} {lcn} is outside the volume's {clusters} clusters"
                ));
            }
        }
        let rec_raw = b[0x40] as i8;
        let record_size: u64 = match rec_raw {
            1..=0x7f => u64::from(rec_raw as u8) * cluster_size,
            -31..=-9 => 1u64 << (-i32::from(rec_raw)),
            _ => {
                return Err(format!(
                    "boot sector clusters_per_mft_record {:#x} is not a valid encoding",
                    rec_raw as u8
                ))
            }
        };
        if !record_size.is_power_of_two()
            || record_size < FIXUP_STRIDE as u64
            || record_size > u64::from(MAX_RECORD)
            || record_size < u64::from(sector_size)
        {
            return Err(format!(
                "MFT record size {record_size} is not a power of two in {}..={MAX_RECORD} bytes",
                sector_size.max(FIXUP_STRIDE as u32)
            ));
        }
        Ok(BootSector {
            sector_size,
            cluster_size,
            total_sectors,
            clusters,
            mft_lcn,
            mftmirr_lcn,
            record_size: record_size as u32,
        })
    }

    /// Bytes of the volume covered by clusters.
    pub fn cluster_bytes(&self) -> u64 {
        self.clusters * self.cluster_size
    }
}

/// Check and undo the update sequence array of a multi-sector record (MFT record,
/// restart page): the last two bytes of every 512-byte stride must hold the update
/// sequence number and get back the saved bytes. A mismatch is a torn write.
pub fn apply_fixups(buf: &mut [u8], what: &str) -> Check<()> {
    let usa_ofs = le16(buf, 4)? as usize;
    let usa_count = le16(buf, 6)? as usize;
    let strides = buf.len() / FIXUP_STRIDE;
    if usa_count != strides + 1 {
        return Err(format!(
            "{what}: update sequence count {usa_count} does not match its {} bytes",
            buf.len()
        ));
    }
    if !usa_ofs.is_multiple_of(2) || usa_ofs < 8 || usa_ofs + 2 * usa_count > FIXUP_STRIDE - 2 {
        return Err(format!(
            "{what}: update sequence array offset {usa_ofs:#x} is misplaced"
        ));
    }
    let usn = [buf[usa_ofs], buf[usa_ofs + 1]];
    for i in 1..usa_count {
        let end = i * FIXUP_STRIDE;
        if buf[end - 2..end] != usn {
            return Err(format!(
                "{what}: fixup of sector {} does not match the update sequence number (torn write)",
                i - 1
            ));
        }
        let saved = [buf[usa_ofs + 2 * i], buf[usa_ofs + 2 * i + 1]];
        buf[end - 2..end].copy_from_slice(&saved);
    }
    Ok(())
}

/// One attribute of an MFT record.
#[derive(Debug, Clone, Copy)]
struct Attr<'a> {
    ty: u32,
    non_resident: bool,
    name_len: u8,
    flags: u16,
    /// The whole attribute, header included.
    raw: &'a [u8],
}

impl<'a> Attr<'a> {
    /// The value of a resident attribute.
    fn resident_value(&self) -> Check<&'a [u8]> {
        if self.non_resident {
            return Err(format!("attribute {:#x} is not resident", self.ty));
        }
        let len = le32(self.raw, 0x10)? as usize;
        let off = le16(self.raw, 0x14)? as usize;
        self.raw
            .get(off..off.saturating_add(len))
            .ok_or_else(|| format!("attribute {:#x} value runs past the attribute", self.ty))
    }
}

/// A validated, fixed-up MFT record.
struct MftRecord {
    buf: Vec<u8>,
    number: u64,
}

impl MftRecord {
    fn parse(mut buf: Vec<u8>, number: u64) -> Check<Self> {
        let what = format!("MFT record {number}");
        match &buf[0..4] {
            b"FILE" => {}
            b"BAAD" => return Err(format!("{what} is marked BAAD (chkdsk found a torn write)")),
            m => return Err(format!("{what} has magic {m:02x?}, not FILE")),
        }
        apply_fixups(&mut buf, &what)?;
        let flags = le16(&buf, 0x16)?;
        if flags & 1 == 0 {
            return Err(format!("{what} is not in use"));
        }
        let in_use = le32(&buf, 0x18)? as usize;
        let allocated = le32(&buf, 0x1c)? as usize;
        if allocated != buf.len() || in_use > buf.len() {
            return Err(format!(
                "{what}: bytes_in_use {in_use} / bytes_allocated {allocated} disagree with the record size {}",
                buf.len()
            ));
        }
        if le64(&buf, 0x20)? != 0 {
            return Err(format!("{what} is an extension record, not a base record"));
        }
        // NTFS 3.1 records (update sequence at 0x30) store their own number.
        let usa_ofs = le16(&buf, 4)?;
        if usa_ofs >= 0x30 && u64::from(le32(&buf, 0x2c)?) != number {
            return Err(format!("{what} says it is record {}", le32(&buf, 0x2c)?));
        }
        let attrs = le16(&buf, 0x14)? as usize;
        if attrs < 0x18 || attrs >= in_use || !attrs.is_multiple_of(8) {
            return Err(format!("{what}: attrs_offset {attrs:#x} is misplaced"));
        }
        buf.truncate(in_use);
        Ok(MftRecord { buf, number })
    }

    fn attrs(&self) -> Check<Vec<Attr<'_>>> {
        let b = &self.buf;
        let mut off = le16(b, 0x14)? as usize;
        let mut out = Vec::new();
        loop {
            let ty = le32(b, off)?;
            if ty == AT_END {
                return Ok(out);
            }
            let len = le32(b, off + 4)? as usize;
            if len < 0x18 || !len.is_multiple_of(8) || off + len > b.len() {
                return Err(format!(
                    "MFT record {}: attribute {ty:#x} at {off:#x} has bad length {len}",
                    self.number
                ));
            }
            let raw = &b[off..off + len];
            let non_resident = raw[8] != 0;
            if non_resident && len < 0x40 {
                return Err(format!(
                    "MFT record {}: non-resident attribute {ty:#x} is only {len} bytes",
                    self.number
                ));
            }
            out.push(Attr {
                ty,
                non_resident,
                name_len: raw[9],
                flags: le16(raw, 0x0c)?,
                raw,
            });
            off += len;
        }
    }

    /// The unnamed attribute of type `ty`.
    fn find(&self, ty: u32) -> Check<Attr<'_>> {
        self.attrs()?
            .into_iter()
            .find(|a| a.ty == ty && a.name_len == 0)
            .ok_or_else(|| format!("MFT record {} has no attribute {ty:#x}", self.number))
    }

    /// The attribute of type `ty` named `$I30` (a directory index's parts).
    fn find_i30(&self, ty: u32) -> Check<Option<Attr<'_>>> {
        for a in self.attrs()? {
            if a.ty == ty && a.name_len == 4 {
                let off = le16(a.raw, 0x0a)? as usize;
                let name = a
                    .raw
                    .get(off..off + 8)
                    .ok_or_else(|| format!("attribute {ty:#x} name runs past it"))?;
                if name == [b'$', 0, b'I', 0, b'3', 0, b'0', 0] {
                    return Ok(Some(a));
                }
            }
        }
        Ok(None)
    }

    fn has(&self, ty: u32) -> Check<bool> {
        Ok(self.attrs()?.iter().any(|a| a.ty == ty))
    }
}

/// One run: `len` clusters at `lcn`, in VCN order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Run {
    lcn: u64,
    len: u64,
}

/// A non-resident attribute's extent: its runs (all inside the volume, none sparse) and
/// its sizes.
#[derive(Debug, Clone)]
struct Stream {
    runs: Vec<Run>,
    /// Clusters mapped by `runs`.
    clusters: u64,
    /// Bytes that hold data written by the filesystem (beyond, the value reads as zeros).
    initialized: u64,
}

/// Decode the mapping pairs of a non-resident attribute. `whole` requires the runs to
/// cover the whole value (no attribute list continuing it elsewhere).
fn parse_stream(a: &Attr<'_>, boot: &BootSector, whole: bool, what: &str) -> Check<Stream> {
    if !a.non_resident {
        return Err(format!("{what} is resident, expected non-resident"));
    }
    if a.flags & 0xc0ff != 0 {
        return Err(format!(
            "{what} is compressed, encrypted or sparse (flags {:#06x})",
            a.flags
        ));
    }
    let raw = a.raw;
    let lowest = le64(raw, 0x10)?;
    let highest = le64(raw, 0x18)?;
    let mp_off = le16(raw, 0x20)? as usize;
    let allocated = le64(raw, 0x28)?;
    let data = le64(raw, 0x30)?;
    let initialized = le64(raw, 0x38)?;
    if lowest != 0 {
        return Err(format!("{what}: lowest_vcn is {lowest}, not 0"));
    }
    if initialized > data || data > allocated || allocated % boot.cluster_size != 0 {
        return Err(format!(
            "{what}: sizes disagree (allocated {allocated}, data {data}, initialized {initialized})"
        ));
    }
    if mp_off < 0x40 || mp_off >= raw.len() {
        return Err(format!(
            "{what}: mapping_pairs_offset {mp_off:#x} is misplaced"
        ));
    }
    let mut runs = Vec::new();
    let mut pos = mp_off;
    let mut lcn: i64 = 0;
    let mut vcn: u64 = 0;
    loop {
        let head = *raw
            .get(pos)
            .ok_or_else(|| format!("{what}: runlist runs past the attribute"))?;
        if head == 0 {
            break;
        }
        let (ln, on) = ((head & 0x0f) as usize, (head >> 4) as usize);
        if ln == 0 || ln > 8 || on > 8 {
            return Err(format!(
                "{what}: runlist header byte {head:#04x} at {pos:#x} is invalid"
            ));
        }
        let body = raw
            .get(pos + 1..pos + 1 + ln + on)
            .ok_or_else(|| format!("{what}: runlist runs past the attribute"))?;
        let signed = |bytes: &[u8]| -> i64 {
            let mut v: i64 = if bytes[bytes.len() - 1] & 0x80 != 0 {
                -1
            } else {
                0
            };
            for &x in bytes.iter().rev() {
                v = (v << 8) | i64::from(x);
            }
            v
        };
        let len = signed(&body[..ln]);
        if len <= 0 {
            return Err(format!("{what}: run at VCN {vcn} has length {len}"));
        }
        if on == 0 {
            return Err(format!("{what}: run at VCN {vcn} is sparse"));
        }
        lcn = lcn
            .checked_add(signed(&body[ln..]))
            .ok_or_else(|| format!("{what}: run at VCN {vcn} overflows"))?;
        let len = len as u64;
        if lcn < 0
            || (lcn as u64)
                .checked_add(len)
                .is_none_or(|e| e > boot.clusters)
        {
            return Err(format!(
                "{what}: run at VCN {vcn} ({len} clusters at LCN {lcn}) lies outside the volume's {} clusters",
                boot.clusters
            ));
        }
        if runs.len() >= MAX_RUNS {
            return Err(format!("{what}: more than {MAX_RUNS} runs"));
        }
        runs.push(Run {
            lcn: lcn as u64,
            len,
        });
        vcn = vcn
            .checked_add(len)
            .filter(|&v| v <= boot.clusters)
            .ok_or_else(|| format!("{what}: runs map more clusters than the volume has"))?;
        pos += 1 + ln + on;
    }
    if highest.checked_add(1) != Some(vcn) {
        return Err(format!(
            "{what}: runs map {vcn} clusters but highest_vcn is {highest}"
        ));
    }
    if whole && vcn.checked_mul(boot.cluster_size) != Some(allocated) {
        return Err(format!(
            "{what}: runs map {vcn} clusters but allocated_size is {allocated} bytes"
        ));
    }
    Ok(Stream {
        runs,
        clusters: vcn,
        initialized,
    })
}

impl Stream {
    /// Read `buf.len()` bytes at byte `offset` of the value, through the runs.
    fn read(
        &self,
        region: &Region<'_>,
        boot: &BootSector,
        buf: &mut [u8],
        offset: u64,
    ) -> Check<()> {
        let cs = boot.cluster_size;
        let end = offset + buf.len() as u64;
        if end > self.clusters.saturating_mul(cs) {
            return Err(format!(
                "read of {} bytes at {offset} runs past the {} mapped bytes",
                buf.len(),
                self.clusters.saturating_mul(cs)
            ));
        }
        let mut done = 0usize;
        let mut run_start = 0u64;
        for r in &self.runs {
            let run_end = run_start + r.len * cs;
            let pos = offset + done as u64;
            if pos < run_end && done < buf.len() {
                let n = ((run_end - pos) as usize).min(buf.len() - done);
                let disk = r.lcn * cs + (pos - run_start);
                region
                    .read_at(&mut buf[done..done + n], disk, "ntfs attribute data")
                    .map_err(|e| e.to_string())?;
                done += n;
            }
            run_start = run_end;
        }
        Ok(())
    }
}

struct Volume<'r, 'a> {
    region: &'r Region<'a>,
    boot: BootSector,
    mft: Stream,
}

impl Volume<'_, '_> {
    fn record(&self, n: u64) -> Check<MftRecord> {
        let rs = u64::from(self.boot.record_size);
        let mut buf = vec![0u8; rs as usize];
        self.mft
            .read(self.region, &self.boot, &mut buf, n * rs)
            .map_err(|e| format!("MFT record {n}: {e}"))?;
        MftRecord::parse(buf, n)
    }

    fn data(&self, n: u64, name: &str, whole: bool) -> Check<Stream> {
        let rec = self.record(n)?;
        if whole && rec.has(AT_ATTRIBUTE_LIST)? {
            return Err(format!(
                "{name} has an attribute list (its runs are spread over several records)"
            ));
        }
        parse_stream(
            &rec.find(AT_DATA)?,
            &self.boot,
            whole,
            &format!("{name} $DATA"),
        )
    }
}

fn open<'r, 'a>(region: &'r Region<'a>, boot: BootSector) -> Check<Volume<'r, 'a>> {
    if boot
        .total_sectors
        .saturating_mul(u64::from(boot.sector_size))
        > region.len()
    {
        return Err(format!(
            "boot sector total_sectors {} ({} bytes) is larger than the partition ({} bytes)",
            boot.total_sectors,
            boot.total_sectors
                .saturating_mul(u64::from(boot.sector_size)),
            region.len()
        ));
    }
    let rs = u64::from(boot.record_size);
    let mut buf = vec![0u8; rs as usize];
    region
        .read_at(
            &mut buf,
            boot.mft_lcn * boot.cluster_size,
            "ntfs $MFT record 0",
        )
        .map_err(|e| e.to_string())?;
    let rec0 = MftRecord::parse(buf, REC_MFT)?;
    let mft = parse_stream(&rec0.find(AT_DATA)?, &boot, false, "$MFT $DATA")?;
    if mft.runs[0].lcn != boot.mft_lcn {
        return Err(format!(
            "$MFT $DATA starts at LCN {}, the boot sector says {}",
            mft.runs[0].lcn, boot.mft_lcn
        ));
    }
    if (REC_BOOT + 1) * rs > mft.clusters.saturating_mul(boot.cluster_size) {
        return Err("$MFT $DATA in its base record does not reach the system files".into());
    }
    let vol = Volume { region, boot, mft };
    // ntfs-3g refuses a volume whose $MFTMirr disagrees with $MFT: so do we.
    let mirror = vol.data(REC_MFTMIRR, "$MFTMirr", true)?;
    if mirror.runs[0].lcn != vol.boot.mftmirr_lcn {
        return Err(format!(
            "$MFTMirr $DATA starts at LCN {}, the boot sector says {}",
            mirror.runs[0].lcn, vol.boot.mftmirr_lcn
        ));
    }
    // As ntfs-3g compares them: after fixups, up to the bytes in use.
    let mirrored = (mirror.clusters * vol.boot.cluster_size / rs).clamp(1, 4);
    let mut a = vec![0u8; rs as usize];
    let mut b = a.clone();
    for i in 0..mirrored {
        vol.mft.read(region, &vol.boot, &mut a, i * rs)?;
        mirror.read(region, &vol.boot, &mut b, i * rs)?;
        apply_fixups(&mut a, &format!("MFT record {i}"))?;
        apply_fixups(&mut b, &format!("$MFTMirr record {i}"))?;
        // The update sequence number itself may differ between the copies.
        for r in [&mut a, &mut b] {
            let usn = le16(r, 4)? as usize;
            r[usn..usn + 2].fill(0);
        }
        let used = (le32(&a, 0x18)? as usize).clamp(0x30, a.len());
        if a[..used] != b[..used] {
            return Err(format!("$MFTMirr differs from $MFT at record {i}"));
        }
    }
    Ok(vol)
}

/// Refuse a volume that was not cleanly shut down.
fn check_clean(vol: &Volume<'_, '_>) -> Check<()> {
    let rec = vol.record(REC_VOLUME)?;
    let info = rec.find(AT_VOLUME_INFORMATION)?.resident_value()?;
    let flags = le16(info, 0x0a)?;
    if flags & VOLUME_IS_DIRTY != 0 {
        return Err(format!(
            "$Volume is marked dirty (flags {flags:#06x}): not cleanly unmounted, run chkdsk"
        ));
    }
    if flags & VOLUME_CHKDSK_UNDERWAY != 0 {
        return Err(format!(
            "$Volume says chkdsk is under way (flags {flags:#06x})"
        ));
    }
    check_logfile(vol)?;
    check_hiberfile(vol)
}

/// The MFT references of the entries named `name` (ASCII, any case) among the index
/// entries of `entries` (an index header's entry area). Entries are walked, not
/// searched, so the collation order is not trusted.
fn find_entries(entries: &[u8], name: &str, out: &mut Vec<u64>) -> Check<()> {
    let mut off = 0usize;
    loop {
        let len = le16(entries, off + 8)? as usize;
        let key_len = le16(entries, off + 0x0a)? as usize;
        let flags = le16(entries, off + 0x0c)?;
        if flags & 2 != 0 {
            return Ok(()); // the last entry carries no key
        }
        if len < 0x10 || !len.is_multiple_of(8) || off + len > entries.len() || 0x10 + key_len > len
        {
            return Err(format!(
                "root directory index entry at {off:#x} has bad length {len}"
            ));
        }
        let key = &entries[off + 0x10..off + 0x10 + key_len];
        if key.len() >= 0x42 {
            let n = key[0x40] as usize;
            if let Some(units) = key.get(0x42..0x42 + 2 * n) {
                let matches = n == name.len()
                    && units
                        .chunks(2)
                        .zip(name.bytes())
                        .all(|(u, c)| u[1] == 0 && u[0].eq_ignore_ascii_case(&c));
                if matches {
                    out.push(le64(entries, off)? & 0x0000_ffff_ffff_ffff);
                }
            }
        }
        off += len;
    }
}

/// The entry area of an index header at `at` in `buf`.
fn index_entries<'b>(buf: &'b [u8], at: usize, what: &str) -> Check<&'b [u8]> {
    let first = le32(buf, at)? as usize;
    let used = le32(buf, at + 4)? as usize;
    if first < 0x10 || first > used || at + used > buf.len() {
        return Err(format!(
            "{what}: index header offsets {first:#x}/{used:#x} are misplaced"
        ));
    }
    Ok(&buf[at + first..at + used])
}

/// Like ntfs-3g, refuse a volume whose `hiberfil.sys` holds a hibernation image
/// (Windows hibernated or fast-started): its cached state would be lost.
fn check_hiberfile(vol: &Volume<'_, '_>) -> Check<()> {
    let root = vol.record(REC_ROOT)?;
    let ir = root
        .find_i30(AT_INDEX_ROOT)?
        .ok_or("the root directory has no $I30 index root")?
        .resident_value()?;
    let mut refs = Vec::new();
    find_entries(
        index_entries(ir, 0x10, "root $INDEX_ROOT")?,
        "hiberfil.sys",
        &mut refs,
    )?;
    if let Some(alloc) = root.find_i30(AT_INDEX_ALLOCATION)? {
        let stream = parse_stream(&alloc, &vol.boot, true, "root $INDEX_ALLOCATION")?;
        let used = root
            .find_i30(AT_BITMAP)?
            .ok_or("the root directory has an index allocation but no $I30 bitmap")?
            .resident_value()?;
        let bs = u64::from(le32(ir, 0x08)?);
        if !bs.is_power_of_two() || !(512..=u64::from(MAX_RECORD)).contains(&bs) {
            return Err(format!("root directory index block size {bs} is invalid"));
        }
        let blocks = (stream.initialized / bs).min(MAX_ROOT_INDEX / bs);
        for i in 0..blocks {
            let in_use = used
                .get((i / 8) as usize)
                .is_some_and(|b| b & (1 << (i % 8)) != 0);
            if !in_use {
                continue;
            }
            let mut b = vec![0u8; bs as usize];
            stream.read(vol.region, &vol.boot, &mut b, i * bs)?;
            let what = format!("root directory index block {i}");
            if &b[0..4] != b"INDX" {
                return Err(format!("{what} has magic {:02x?}, not INDX", &b[0..4]));
            }
            apply_fixups(&mut b, &what)?;
            find_entries(index_entries(&b, 0x18, &what)?, "hiberfil.sys", &mut refs)?;
        }
    }
    for r in refs {
        let rec = vol.record(r)?;
        let data = rec.find(AT_DATA)?;
        let mut head = [0u8; 4];
        if data.non_resident {
            let s = parse_stream(&data, &vol.boot, false, "hiberfil.sys $DATA")?;
            if s.initialized < 4 {
                continue;
            }
            s.read(vol.region, &vol.boot, &mut head, 0)?;
        } else {
            match data.resident_value()?.get(0..4) {
                Some(h) => head.copy_from_slice(h),
                None => continue,
            }
        }
        let h = head.to_ascii_lowercase();
        if &h == b"hibr" || &h == b"wake" {
            return Err(format!(
                "hiberfil.sys holds a hibernation image (\"{}\"): Windows is hibernated or fast-started",
                String::from_utf8_lossy(&head)
            ));
        }
    }
    Ok(())
}

/// `$LogFile` must be empty or record a clean shutdown in its newest restart area.
fn check_logfile(vol: &Volume<'_, '_>) -> Check<()> {
    let log = vol.data(REC_LOGFILE, "$LogFile", true)?;
    let mapped = log.clusters * vol.boot.cluster_size;
    if log.initialized < 2 * 4096 || mapped < 2 * 4096 {
        return Err(format!("$LogFile is only {} bytes", log.initialized));
    }
    let mut head = vec![0u8; 8192];
    log.read(vol.region, &vol.boot, &mut head, 0)?;
    if head.iter().all(|&x| x == 0xff) {
        return Ok(()); // emptied: nothing to replay
    }
    let mut newest: Option<(u64, u16, u16)> = None;
    let mut at = 0u64;
    for copy in 0..2 {
        let mut page = vec![0u8; 512];
        log.read(vol.region, &vol.boot, &mut page, at)?;
        if &page[0..4] != b"RSTR" {
            if copy == 0 {
                return Err(format!(
                    "$LogFile restart page has magic {:02x?}, not RSTR (not provably clean)",
                    &page[0..4]
                ));
            }
            break;
        }
        let sys_page = le32(&page, 0x10)?;
        if !sys_page.is_power_of_two() || !(512..=MAX_RECORD).contains(&sys_page) {
            return Err(format!("$LogFile system_page_size {sys_page} is invalid"));
        }
        let mut page = vec![0u8; sys_page as usize];
        log.read(vol.region, &vol.boot, &mut page, at)?;
        apply_fixups(&mut page, "$LogFile restart page")?;
        let major = le16(&page, 0x1c)? as i16;
        let minor = le16(&page, 0x1a)? as i16;
        if !matches!((major, minor), (1, 1) | (2, 0)) {
            return Err(format!("$LogFile version {major}.{minor} is not known"));
        }
        let ra = le16(&page, 0x18)? as usize;
        if !ra.is_multiple_of(8) || ra + 0x30 > page.len() {
            return Err(format!("$LogFile restart_area_offset {ra:#x} is misplaced"));
        }
        let lsn = le64(&page, ra)?;
        let in_use = le16(&page, ra + 0x0c)?;
        let flags = le16(&page, ra + 0x0e)?;
        if newest.is_none_or(|(l, _, _)| lsn > l) {
            newest = Some((lsn, in_use, flags));
        }
        // The second copy sits one system page after the first.
        at = u64::from(sys_page);
    }
    let (lsn, in_use, flags) = newest.ok_or("$LogFile has no restart area")?;
    if in_use != LOGFILE_NO_CLIENT && flags & RESTART_VOLUME_IS_CLEAN == 0 {
        return Err(format!(
            "$LogFile restart area (LSN {lsn}) has a client in use and no clean flag: \
             Windows did not shut down cleanly (hibernation or fast startup)"
        ));
    }
    Ok(())
}

fn read_bitmap(vol: &Volume<'_, '_>, bm: &Stream, buf: &mut [u8], from: u64) -> Check<()> {
    bm.read(vol.region, &vol.boot, buf, from)
        .map_err(|e| format!("$Bitmap: {e}"))
}

/// Every cluster of `runs` must be marked used in the bitmap.
fn check_used(vol: &Volume<'_, '_>, bm: &Stream, runs: &[Run], name: &str) -> Check<()> {
    let mut buf = Vec::new();
    for r in runs {
        // In bitmap chunks: a run may be as long as the volume.
        let mut c = r.lcn;
        while c < r.lcn + r.len {
            let upto = (r.lcn + r.len).min((c / 8 + CHUNK) * 8);
            let first = c / 8;
            buf.resize(((upto - 1) / 8 - first + 1) as usize, 0);
            read_bitmap(vol, bm, &mut buf, first)?;
            for k in c..upto {
                if buf[(k / 8 - first) as usize] & (1 << (k % 8)) == 0 {
                    return Err(format!(
                        "$Bitmap marks cluster {k} of {name} free: the bitmap is not to be trusted"
                    ));
                }
            }
            c = upto;
        }
    }
    Ok(())
}

fn scan_volume(region: &Region<'_>, boot: BootSector, sink: &mut dyn FreeSink) -> Check<()> {
    let vol = open(region, boot)?;
    check_clean(&vol)?;
    let bm = vol.data(REC_BITMAP, "$Bitmap", true)?;
    let need = vol.boot.clusters.div_ceil(8);
    if bm.initialized < need {
        return Err(format!(
            "$Bitmap holds {} initialized bytes, fewer than the {need} its {} clusters need",
            bm.initialized, vol.boot.clusters
        ));
    }
    // The system files that must never be dropped: a bitmap calling them free is wrong.
    let boot_runs = [Run { lcn: 0, len: 1 }];
    check_used(&vol, &bm, &boot_runs, "the boot sector")?;
    check_used(&vol, &bm, &vol.mft.runs, "$MFT")?;
    check_used(&vol, &bm, &bm.runs, "$Bitmap")?;
    for (n, name) in [
        (REC_MFTMIRR, "$MFTMirr"),
        (REC_LOGFILE, "$LogFile"),
        (REC_BOOT, "$Boot"),
    ] {
        let s = vol.data(n, name, true)?;
        check_used(&vol, &bm, &s.runs, name)?;
    }
    let cs = vol.boot.cluster_size;
    let mut run: Option<u64> = None;
    let flush = |run: &mut Option<u64>, upto: u64, sink: &mut dyn FreeSink| {
        if let Some(s) = run.take() {
            sink.free(s * cs, (upto - s) * cs);
        }
    };
    let mut buf = vec![0u8; CHUNK.min(need) as usize];
    let mut at = 0u64;
    while at < need {
        let n = CHUNK.min(need - at) as usize;
        read_bitmap(&vol, &bm, &mut buf[..n], at)?;
        for (i, &byte) in buf[..n].iter().enumerate() {
            let base = (at + i as u64) * 8;
            match byte {
                0x00 if base + 8 <= vol.boot.clusters => {
                    run.get_or_insert(base);
                }
                0xff => flush(&mut run, base, sink),
                _ => {
                    for bit in 0..8u64 {
                        let c = base + bit;
                        if c >= vol.boot.clusters {
                            break;
                        }
                        if byte & (1 << bit) == 0 {
                            run.get_or_insert(c);
                        } else {
                            flush(&mut run, c, sink);
                        }
                    }
                }
            }
        }
        at += n as u64;
    }
    flush(&mut run, vol.boot.clusters, sink);
    Ok(())
}

/// Report the free clusters of an NTFS volume at the start of `region`: the clear bits of
/// `$Bitmap`, once the boot sector, the system records, `$MFTMirr`, `$Volume` and
/// `$LogFile` all validate and say the volume was cleanly shut down.
pub fn scan(region: &Region<'_>, sink: &mut dyn FreeSink) -> Result<Outcome> {
    if region.len() < 512 {
        return Ok(Outcome::NotMine);
    }
    let mut sector = [0u8; 512];
    region.read_at(&mut sector, 0, "ntfs boot sector")?;
    let fs = "ntfs".to_string();
    let boot = match BootSector::parse(&sector) {
        None => return Ok(Outcome::NotMine),
        Some(Err(reason)) => return Ok(Outcome::Skipped { fs, reason }),
        Some(Ok(b)) => b,
    };
    Ok(match scan_volume(region, boot, sink) {
        Ok(()) => Outcome::Scanned { fs },
        Err(reason) => Outcome::Skipped { fs, reason },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn boot_bytes(spc: u8, rec: i8) -> Vec<u8> {
        let mut b = vec![0u8; 512];
        b[3..11].copy_from_slice(b"NTFS    ");
        b[0x0b..0x0d].copy_from_slice(&512u16.to_le_bytes());
        b[0x0d] = spc;
        b[0x28..0x30].copy_from_slice(&131071u64.to_le_bytes());
        b[0x30..0x38].copy_from_slice(&4u64.to_le_bytes());
        b[0x38..0x40].copy_from_slice(&100u64.to_le_bytes());
        b[0x40] = rec as u8;
        b[510] = 0x55;
        b[511] = 0xaa;
        b
    }

    #[test]
    fn boot_sector_encodings() {
        let b = BootSector::parse(&boot_bytes(8, -10)).unwrap().unwrap();
        assert_eq!(
            (b.cluster_size, b.record_size, b.clusters),
            (4096, 1024, 16383)
        );
        // 0xf7: a negative shift, 2^9 sectors = 256 KiB clusters; records of 2^12 bytes.
        let b = BootSector::parse(&boot_bytes(0xf7, -12)).unwrap().unwrap();
        assert_eq!(
            (b.cluster_size, b.record_size, b.clusters),
            (256 << 10, 4096, 255)
        );
        // 0xf4 would be 2 MiB clusters: then the MFT mirror at LCN 100 is past the end.
        let e = BootSector::parse(&boot_bytes(0xf4, -10))
            .unwrap()
            .unwrap_err();
        assert!(e.contains("mftmirr_lcn"), "{e}");
        // A record of one 128 KiB cluster is past the limit.
        let e = BootSector::parse(&boot_bytes(0x80, 2))
            .unwrap()
            .unwrap_err();
        assert!(e.contains("record size"), "{e}");
        assert!(BootSector::parse(&boot_bytes(3, -10)).unwrap().is_err());
        assert!(BootSector::parse(&boot_bytes(8, 0)).unwrap().is_err());
        let mut notntfs = boot_bytes(8, -10);
        notntfs[3] = b'X';
        assert!(BootSector::parse(&notntfs).is_none());
    }

    #[test]
    fn fixups_are_checked_and_undone() {
        let mut rec = vec![0u8; 1024];
        rec[4..6].copy_from_slice(&0x30u16.to_le_bytes());
        rec[6..8].copy_from_slice(&3u16.to_le_bytes());
        rec[0x30..0x32].copy_from_slice(&[7, 0]);
        rec[0x32..0x34].copy_from_slice(&[0xaa, 0xbb]);
        rec[0x34..0x36].copy_from_slice(&[0xcc, 0xdd]);
        rec[510..512].copy_from_slice(&[7, 0]);
        rec[1022..1024].copy_from_slice(&[7, 0]);
        let mut ok = rec.clone();
        apply_fixups(&mut ok, "t").unwrap();
        assert_eq!(
            (&ok[510..512], &ok[1022..1024]),
            (&[0xaa, 0xbb][..], &[0xcc, 0xdd][..])
        );
        rec[1023] = 9;
        assert!(apply_fixups(&mut rec, "t")
            .unwrap_err()
            .contains("sector 1"));
    }

    /// A non-resident attribute with `pairs` as its mapping pairs and `clusters` mapped.
    fn nonres(pairs: &[u8], clusters: u64) -> Vec<u8> {
        let mut a = vec![0u8; 0x40];
        a[0..4].copy_from_slice(&AT_DATA.to_le_bytes());
        a[8] = 1;
        a[0x18..0x20].copy_from_slice(&(clusters - 1).to_le_bytes());
        a[0x20..0x22].copy_from_slice(&0x40u16.to_le_bytes());
        for off in [0x28, 0x30, 0x38] {
            a[off..off + 8].copy_from_slice(&(clusters * 4096).to_le_bytes());
        }
        a.extend_from_slice(pairs);
        a.push(0);
        while !a.len().is_multiple_of(8) {
            a.push(0);
        }
        let len = a.len() as u32;
        a[4..8].copy_from_slice(&len.to_le_bytes());
        a
    }

    fn stream(raw: &[u8]) -> Check<Stream> {
        let boot = BootSector::parse(&boot_bytes(8, -10)).unwrap().unwrap();
        let a = Attr {
            ty: AT_DATA,
            non_resident: true,
            name_len: 0,
            flags: le16(raw, 0x0c).unwrap(),
            raw,
        };
        parse_stream(&a, &boot, true, "t")
    }

    #[test]
    fn runlists_are_decoded_and_bounded() {
        // 16 clusters at 0x1000, then 8 at 0x1000 - 0x10 (a negative delta).
        let s = stream(&nonres(&[0x21, 0x10, 0x00, 0x10, 0x11, 0x08, 0xf0], 24)).unwrap();
        assert_eq!(
            s.runs,
            vec![
                Run {
                    lcn: 0x1000,
                    len: 16
                },
                Run { lcn: 0xff0, len: 8 }
            ]
        );
        // A sparse run (no offset bytes).
        let e = stream(&nonres(&[0x01, 0x08], 8)).unwrap_err();
        assert!(e.contains("sparse"), "{e}");
        // A run past the volume's 16383 clusters.
        let e = stream(&nonres(&[0x21, 0x10, 0xff, 0x3f], 16)).unwrap_err();
        assert!(e.contains("outside the volume"), "{e}");
        // A negative delta before cluster 0.
        let e = stream(&nonres(&[0x11, 0x08, 0x80], 8)).unwrap_err();
        assert!(e.contains("outside the volume"), "{e}");
        // Runs mapping fewer clusters than highest_vcn says.
        let e = stream(&nonres(&[0x11, 0x08, 0x10], 9)).unwrap_err();
        assert!(e.contains("highest_vcn"), "{e}");
        // A header byte with a 9-byte length field.
        let e = stream(&nonres(&[0x19, 0x08], 8)).unwrap_err();
        assert!(e.contains("header byte"), "{e}");
        // Compressed.
        let mut c = nonres(&[0x11, 0x08, 0x10], 8);
        c[0x0c] = 1;
        assert!(stream(&c).unwrap_err().contains("compressed"));
        // A runlist running off the end of its attribute.
        let mut t = nonres(&[0x21, 0x10], 16);
        t.truncate(0x42);
        let len = t.len() as u32;
        t[4..8].copy_from_slice(&len.to_le_bytes());
        assert!(stream(&t).unwrap_err().contains("runs past"));
    }
}
