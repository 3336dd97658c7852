//! A registry hive writer for the tests only: a tree of keys with REG_SZ and REG_DWORD
//! values laid out as Windows does (base block, one hbin, nk/lf/vk cells), so Windows
//! inspection is tested on hives whose every byte we know.
#![allow(dead_code)]

/// A value.
pub enum V {
    Sz(&'static str),
    Dword(u32),
}

/// A key: its name, values and subkeys.
pub struct Key {
    pub name: &'static str,
    pub values: Vec<(&'static str, V)>,
    pub subkeys: Vec<Key>,
}

/// A key at `path` (created along the way) under `root`, with `values`.
pub fn put(root: &mut Key, path: &[&'static str], values: Vec<(&'static str, V)>) {
    let mut k = root;
    for p in path {
        let i = match k.subkeys.iter().position(|s| s.name == *p) {
            Some(i) => i,
            None => {
                k.subkeys.push(Key {
                    name: p,
                    values: Vec::new(),
                    subkeys: Vec::new(),
                });
                k.subkeys.len() - 1
            }
        };
        k = &mut k.subkeys[i];
    }
    k.values.extend(values);
}

struct Bin(Vec<u8>);

impl Bin {
    /// Append a cell holding `data`; its offset relative to the first hbin.
    fn cell(&mut self, data: &[u8]) -> u32 {
        let off = self.0.len() as u32;
        let len = (data.len() + 4).div_ceil(8) * 8;
        self.0.extend_from_slice(&(-(len as i32)).to_le_bytes());
        self.0.extend_from_slice(data);
        self.0.resize(off as usize + len, 0);
        off
    }
}

fn key(bin: &mut Bin, k: &Key, root: bool) -> u32 {
    let subs: Vec<u32> = k.subkeys.iter().map(|s| key(bin, s, false)).collect();
    let list = if subs.is_empty() {
        u32::MAX
    } else {
        let mut lf = b"lf".to_vec();
        lf.extend_from_slice(&(subs.len() as u16).to_le_bytes());
        for (o, s) in subs.iter().zip(&k.subkeys) {
            lf.extend_from_slice(&o.to_le_bytes());
            let mut hint = [0u8; 4];
            for (h, c) in hint.iter_mut().zip(s.name.bytes()) {
                *h = c;
            }
            lf.extend_from_slice(&hint);
        }
        bin.cell(&lf)
    };
    let mut vals = Vec::new();
    for (name, v) in &k.values {
        let (kind, size, off) = match v {
            V::Dword(d) => (4u32, 4u32 | 0x8000_0000, *d),
            V::Sz(s) => {
                let mut b: Vec<u8> = s.encode_utf16().flat_map(|u| u.to_le_bytes()).collect();
                b.extend_from_slice(&[0, 0]);
                (1, b.len() as u32, bin.cell(&b))
            }
        };
        let mut vk = b"vk".to_vec();
        vk.extend_from_slice(&(name.len() as u16).to_le_bytes());
        vk.extend_from_slice(&size.to_le_bytes());
        vk.extend_from_slice(&off.to_le_bytes());
        vk.extend_from_slice(&kind.to_le_bytes());
        vk.extend_from_slice(&1u16.to_le_bytes());
        vk.extend_from_slice(&[0, 0]);
        vk.extend_from_slice(name.as_bytes());
        vals.push(bin.cell(&vk));
    }
    let vlist = if vals.is_empty() {
        u32::MAX
    } else {
        bin.cell(
            &vals
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect::<Vec<u8>>(),
        )
    };
    let mut nk = vec![0u8; 0x4C];
    nk[0..2].copy_from_slice(b"nk");
    let flags: u16 = if root { 0x2C } else { 0x20 };
    nk[2..4].copy_from_slice(&flags.to_le_bytes());
    nk[0x14..0x18].copy_from_slice(&(subs.len() as u32).to_le_bytes());
    nk[0x1C..0x20].copy_from_slice(&list.to_le_bytes());
    nk[0x20..0x24].copy_from_slice(&u32::MAX.to_le_bytes());
    nk[0x24..0x28].copy_from_slice(&(vals.len() as u32).to_le_bytes());
    nk[0x28..0x2C].copy_from_slice(&vlist.to_le_bytes());
    nk[0x2C..0x34].copy_from_slice(&[0xFF; 8]);
    nk[0x48..0x4A].copy_from_slice(&(k.name.len() as u16).to_le_bytes());
    nk.extend_from_slice(k.name.as_bytes());
    bin.cell(&nk)
}

/// The hive of `root`.
pub fn write(root: &Key) -> Vec<u8> {
    let mut bin = Bin(vec![0u8; 32]);
    let root_off = key(&mut bin, root, true);
    let size = (bin.0.len() + 8).div_ceil(4096) * 4096;
    let free = size - bin.0.len();
    bin.0.extend_from_slice(&(free as i32).to_le_bytes());
    bin.0.resize(size, 0);
    bin.0[0..4].copy_from_slice(b"hbin");
    bin.0[8..12].copy_from_slice(&(size as u32).to_le_bytes());
    let mut base = vec![0u8; 4096];
    base[0..4].copy_from_slice(b"regf");
    base[4..8].copy_from_slice(&1u32.to_le_bytes());
    base[8..12].copy_from_slice(&1u32.to_le_bytes());
    base[0x14..0x18].copy_from_slice(&1u32.to_le_bytes());
    base[0x18..0x1C].copy_from_slice(&5u32.to_le_bytes());
    base[0x20..0x24].copy_from_slice(&1u32.to_le_bytes());
    base[0x24..0x28].copy_from_slice(&root_off.to_le_bytes());
    base[0x28..0x2C].copy_from_slice(&(size as u32).to_le_bytes());
    base[0x2C..0x30].copy_from_slice(&1u32.to_le_bytes());
    let sum = (0..508).step_by(4).fold(0u32, |x, o| {
        x ^ u32::from_le_bytes(base[o..o + 4].try_into().unwrap())
    });
    base[508..512].copy_from_slice(&sum.to_le_bytes());
    base.extend_from_slice(&bin.0);
    base
}

/// A SOFTWARE hive of Windows Server 2022 Datacenter, build 20348.
pub fn software_2022() -> Vec<u8> {
    let mut root = Key {
        name: "ROOT",
        values: Vec::new(),
        subkeys: Vec::new(),
    };
    put(
        &mut root,
        &["Microsoft", "Windows", "CurrentVersion"],
        vec![("ProgramFilesDir", V::Sz("C:\\Program Files"))],
    );
    put(
        &mut root,
        &["Microsoft", "Windows NT", "CurrentVersion"],
        vec![
            ("SystemRoot", V::Sz("C:\\Windows")),
            ("ProductName", V::Sz("Windows Server 2022 Datacenter")),
            ("EditionID", V::Sz("ServerDatacenter")),
            ("InstallationType", V::Sz("Server")),
            ("CurrentVersion", V::Sz("6.3")),
            ("CurrentBuild", V::Sz("20348")),
            ("CurrentBuildNumber", V::Sz("20348")),
            ("CurrentMajorVersionNumber", V::Dword(10)),
            ("CurrentMinorVersionNumber", V::Dword(0)),
        ],
    );
    write(&root)
}

/// A SYSTEM hive whose current control set (2) names the computer and architecture.
pub fn system(hostname: &'static str) -> Vec<u8> {
    let mut root = Key {
        name: "ROOT",
        values: Vec::new(),
        subkeys: Vec::new(),
    };
    put(
        &mut root,
        &["Select"],
        vec![("Current", V::Dword(2)), ("Default", V::Dword(2))],
    );
    put(
        &mut root,
        &["ControlSet001", "Control", "ComputerName", "ComputerName"],
        vec![("ComputerName", V::Sz("STALE-NAME"))],
    );
    put(
        &mut root,
        &["ControlSet002", "Control", "ComputerName", "ComputerName"],
        vec![("ComputerName", V::Sz(hostname))],
    );
    put(
        &mut root,
        &["ControlSet002", "Control", "Session Manager", "Environment"],
        vec![
            ("PROCESSOR_ARCHITECTURE", V::Sz("AMD64")),
            ("OS", V::Sz("Windows_NT")),
        ],
    );
    write(&root)
}
