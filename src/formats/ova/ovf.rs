//! The OVF descriptor (DMTF DSP0243): what the reader needs from it (References/File and
//! DiskSection/Disk) and the minimal OVF 1.0 envelope the writer emits.
//!
//! Elements and attributes are matched by local name, whatever their prefix, as Glance's
//! extractor does (descriptors in the wild use the default namespace, `ovf:` or none). A
//! document type declaration is refused: entity definitions are the XML bomb and the
//! external-entity read, and no OVF needs one.

use quick_xml::events::{BytesStart, Event};

use crate::error::{Error, Result};

/// The largest descriptor read (ovftool's are a few KiB; VirtualBox's tens).
pub const MAX_OVF: u64 = 16 << 20;
/// Element nesting accepted (real descriptors nest 5 deep).
const MAX_DEPTH: usize = 64;
/// Entries accepted in References and DiskSection.
const MAX_ENTRIES: usize = 256;

/// The vmdk subformat URI the writer records (VMware's, which VirtualBox also writes).
pub const FORMAT_STREAM_OPTIMIZED: &str =
    "http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized";

/// A `References/File`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileRef {
    /// `ovf:id`.
    pub id: String,
    /// `ovf:href`: the member name.
    pub href: String,
    /// `ovf:size`, when given.
    pub size: Option<u64>,
    /// `ovf:compression` (`gzip`), when given.
    pub compression: Option<String>,
    /// `ovf:chunkSize`, when given (a disk split into `href.000000000`, ...).
    pub chunk_size: Option<u64>,
}

/// A `DiskSection/Disk`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiskRef {
    /// `ovf:diskId`.
    pub disk_id: String,
    /// `ovf:fileRef`: the File id holding its image (None: a blank disk to create).
    pub file_ref: Option<String>,
    /// `ovf:capacity` times `ovf:capacityAllocationUnits`, in bytes (None when the
    /// capacity is a `${property}` reference or absent).
    pub capacity: Option<u64>,
    /// `ovf:populatedSize`, when given.
    pub populated_size: Option<u64>,
    /// `ovf:format`.
    pub format: Option<String>,
}

/// What the reader takes from a descriptor.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Descriptor {
    /// References/File, in document order.
    pub files: Vec<FileRef>,
    /// DiskSection/Disk, in document order.
    pub disks: Vec<DiskRef>,
    /// How many VirtualSystem elements (a VirtualSystemCollection holds several).
    pub virtual_systems: usize,
}

fn local(name: &[u8]) -> &[u8] {
    match name.iter().rposition(|&b| b == b':') {
        Some(i) => &name[i + 1..],
        None => name,
    }
}

fn attrs(e: &BytesStart<'_>) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for a in e.attributes() {
        let a = a.map_err(|err| xml_error(format!("bad attribute: {err}")))?;
        let key = String::from_utf8_lossy(local(a.key.as_ref())).into_owned();
        let v = a
            .unescape_value()
            .map_err(|err| xml_error(format!("bad attribute value of {key}: {err}")))?;
        out.push((key, v.into_owned()));
    }
    Ok(out)
}

fn xml_error(msg: String) -> Error {
    Error::invalid(format!("OVF descriptor: {msg}")).with_field("ovf")
}

fn get<'a>(a: &'a [(String, String)], key: &str) -> Option<&'a str> {
    a.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

fn number(a: &[(String, String)], key: &str, what: &str) -> Result<Option<u64>> {
    match get(a, key) {
        None => Ok(None),
        Some(v) if v.starts_with("${") => Ok(None),
        Some(v) => v
            .trim()
            .parse::<u64>()
            .map(Some)
            .map_err(|_| xml_error(format!("{what} ovf:{key}=\"{v}\" is not a number"))),
    }
}

/// `byte`, `byte * 2^20`, `byte*2^30`, `MegaBytes`, `GigaBytes`: the multiplier.
pub fn allocation_units(s: &str) -> Option<u64> {
    let t: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    let t = t.to_ascii_lowercase();
    match t.as_str() {
        "byte" | "bytes" => return Some(1),
        "kilobytes" => return Some(1 << 10),
        "megabytes" => return Some(1 << 20),
        "gigabytes" => return Some(1 << 30),
        _ => {}
    }
    let exp = t.strip_prefix("byte*2^")?.parse::<u32>().ok()?;
    (exp < 64).then(|| 1u64 << exp)
}

impl Descriptor {
    /// Parse descriptor text.
    pub fn parse(xml: &[u8]) -> Result<Descriptor> {
        let mut r = quick_xml::Reader::from_reader(xml);
        r.config_mut().expand_empty_elements = false;
        let mut stack: Vec<Vec<u8>> = Vec::new();
        let mut d = Descriptor::default();
        let mut saw_envelope = false;
        let mut buf = Vec::new();
        loop {
            let ev = r
                .read_event_into(&mut buf)
                .map_err(|e| xml_error(format!("at byte {}: {e}", r.buffer_position())))?;
            let (e, empty) = match &ev {
                Event::Start(e) => (e, false),
                Event::Empty(e) => (e, true),
                Event::End(_) => {
                    stack.pop();
                    buf.clear();
                    continue;
                }
                Event::DocType(_) => {
                    return Err(Error::unsupported(
                        "OVF descriptor has a DOCTYPE (entity definitions): refused",
                    )
                    .with_field("ovf"))
                }
                Event::Eof => break,
                _ => {
                    buf.clear();
                    continue;
                }
            };
            let name = local(e.name().as_ref()).to_vec();
            if stack.is_empty() {
                if name != b"Envelope" {
                    return Err(xml_error(format!(
                        "the root element is <{}>, not <Envelope>",
                        String::from_utf8_lossy(&name)
                    )));
                }
                saw_envelope = true;
            }
            let parent = stack.last().map(Vec::as_slice);
            match (parent, name.as_slice()) {
                (Some(b"References"), b"File") => {
                    let a = attrs(e)?;
                    let href = get(&a, "href")
                        .ok_or_else(|| xml_error("a References/File has no ovf:href".into()))?;
                    d.files.push(FileRef {
                        id: get(&a, "id").unwrap_or_default().to_string(),
                        href: href.to_string(),
                        size: number(&a, "size", "File")?,
                        compression: get(&a, "compression")
                            .filter(|c| !c.is_empty() && *c != "identity")
                            .map(str::to_string),
                        chunk_size: number(&a, "chunkSize", "File")?,
                    });
                }
                (Some(b"DiskSection"), b"Disk") => {
                    let a = attrs(e)?;
                    let id = get(&a, "diskId").unwrap_or_default().to_string();
                    let units = match get(&a, "capacityAllocationUnits") {
                        None => 1,
                        Some(u) => allocation_units(u).ok_or_else(|| {
                            xml_error(format!(
                                "disk '{id}': ovf:capacityAllocationUnits=\"{u}\" is not understood"
                            ))
                        })?,
                    };
                    let capacity = match number(&a, "capacity", "Disk")? {
                        None => None,
                        Some(c) => Some(c.checked_mul(units).ok_or_else(|| {
                            xml_error(format!("disk '{id}': capacity overflows 64 bits"))
                        })?),
                    };
                    d.disks.push(DiskRef {
                        disk_id: id,
                        file_ref: get(&a, "fileRef").map(str::to_string),
                        capacity,
                        populated_size: number(&a, "populatedSize", "Disk")?,
                        format: get(&a, "format").map(str::to_string),
                    });
                }
                (_, b"VirtualSystem") => d.virtual_systems += 1,
                _ => {}
            }
            if d.files.len() > MAX_ENTRIES || d.disks.len() > MAX_ENTRIES {
                return Err(Error::limit(format!(
                    "OVF descriptor lists more than {MAX_ENTRIES} files or disks"
                )));
            }
            if !empty {
                if stack.len() >= MAX_DEPTH {
                    return Err(Error::limit(format!(
                        "OVF descriptor nests elements deeper than {MAX_DEPTH}"
                    )));
                }
                stack.push(name);
            }
            buf.clear();
        }
        if !saw_envelope {
            return Err(xml_error("no <Envelope> element".into()));
        }
        Ok(d)
    }
}

/// Escape text for an XML attribute or element.
fn esc(s: &str) -> String {
    quick_xml::escape::escape(s).into_owned()
}

/// What the writer's descriptor says.
#[derive(Debug, Clone)]
pub struct Envelope<'a> {
    /// The virtual system's name and id.
    pub name: &'a str,
    /// The disk member's name.
    pub disk_file: &'a str,
    /// The disk member's length.
    pub disk_file_size: u64,
    /// The guest size.
    pub capacity: u64,
    /// Guest bytes the image holds.
    pub populated_size: u64,
    /// SCSI (`lsilogic`, `buslogic`) or IDE (`ide`).
    pub adapter: &'a str,
    /// `vmx-NN`.
    pub system_type: String,
}

impl Envelope<'_> {
    /// The OVF 1.0 document: one VirtualSystem (1 vCPU, 1 GiB, one NIC on "VM Network")
    /// with the disk attached to controller 0. The rasd elements of each Item are in the
    /// schema's (alphabetical) order, which vSphere enforces.
    pub fn to_xml(&self) -> String {
        let name = esc(self.name);
        let file = esc(self.disk_file);
        let (controller, ctype, subtype) = match self.adapter {
            "ide" => ("IDE Controller 0", 5, None),
            a => ("SCSI Controller 0", 6, Some(a)),
        };
        let subtype = subtype
            .map(|s| {
                format!(
                    "        <rasd:ResourceSubType>{}</rasd:ResourceSubType>\n",
                    esc(s)
                )
            })
            .unwrap_or_default();
        format!(
            r#"<?xml version="1.0" encoding="UTF-8"?>
<Envelope ovf:version="1.0" xml:lang="en-US" xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1" xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData" xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
  <References>
    <File ovf:href="{file}" ovf:id="file1" ovf:size="{size}"/>
  </References>
  <DiskSection>
    <Info>Virtual disk information</Info>
    <Disk ovf:capacity="{cap}" ovf:capacityAllocationUnits="byte" ovf:diskId="vmdisk1" ovf:fileRef="file1" ovf:format="{fmt}" ovf:populatedSize="{pop}"/>
  </DiskSection>
  <NetworkSection>
    <Info>The list of logical networks</Info>
    <Network ovf:name="VM Network">
      <Description>The VM Network network</Description>
    </Network>
  </NetworkSection>
  <VirtualSystem ovf:id="{name}">
    <Info>A virtual machine</Info>
    <Name>{name}</Name>
    <OperatingSystemSection ovf:id="102">
      <Info>The kind of installed guest operating system</Info>
      <Description>Other 64-Bit</Description>
    </OperatingSystemSection>
    <VirtualHardwareSection>
      <Info>Virtual hardware requirements</Info>
      <System>
        <vssd:ElementName>Virtual Hardware Family</vssd:ElementName>
        <vssd:InstanceID>0</vssd:InstanceID>
        <vssd:VirtualSystemIdentifier>{name}</vssd:VirtualSystemIdentifier>
        <vssd:VirtualSystemType>{vst}</vssd:VirtualSystemType>
      </System>
      <Item>
        <rasd:AllocationUnits>hertz * 10^6</rasd:AllocationUnits>
        <rasd:Description>Number of Virtual CPUs</rasd:Description>
        <rasd:ElementName>1 virtual CPU(s)</rasd:ElementName>
        <rasd:InstanceID>1</rasd:InstanceID>
        <rasd:ResourceType>3</rasd:ResourceType>
        <rasd:VirtualQuantity>1</rasd:VirtualQuantity>
      </Item>
      <Item>
        <rasd:AllocationUnits>byte * 2^20</rasd:AllocationUnits>
        <rasd:Description>Memory Size</rasd:Description>
        <rasd:ElementName>1024MB of memory</rasd:ElementName>
        <rasd:InstanceID>2</rasd:InstanceID>
        <rasd:ResourceType>4</rasd:ResourceType>
        <rasd:VirtualQuantity>1024</rasd:VirtualQuantity>
      </Item>
      <Item>
        <rasd:Address>0</rasd:Address>
        <rasd:Description>{ctl_desc}</rasd:Description>
        <rasd:ElementName>{controller}</rasd:ElementName>
        <rasd:InstanceID>3</rasd:InstanceID>
{subtype}        <rasd:ResourceType>{ctype}</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:AddressOnParent>0</rasd:AddressOnParent>
        <rasd:ElementName>Hard Disk 1</rasd:ElementName>
        <rasd:HostResource>ovf:/disk/vmdisk1</rasd:HostResource>
        <rasd:InstanceID>4</rasd:InstanceID>
        <rasd:Parent>3</rasd:Parent>
        <rasd:ResourceType>17</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:AddressOnParent>7</rasd:AddressOnParent>
        <rasd:AutomaticAllocation>true</rasd:AutomaticAllocation>
        <rasd:Connection>VM Network</rasd:Connection>
        <rasd:Description>E1000 ethernet adapter on "VM Network"</rasd:Description>
        <rasd:ElementName>Network adapter 1</rasd:ElementName>
        <rasd:InstanceID>5</rasd:InstanceID>
        <rasd:ResourceSubType>E1000</rasd:ResourceSubType>
        <rasd:ResourceType>10</rasd:ResourceType>
      </Item>
    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>
"#,
            size = self.disk_file_size,
            cap = self.capacity,
            fmt = FORMAT_STREAM_OPTIMIZED,
            pop = self.populated_size,
            vst = esc(&self.system_type),
            ctl_desc = if ctype == 5 {
                "IDE Controller"
            } else {
                "SCSI Controller"
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_envelope_parses_back() {
        let env = Envelope {
            name: "a<b>&\"c",
            disk_file: "x-disk1.vmdk",
            disk_file_size: 12345,
            capacity: 1 << 30,
            populated_size: 4096,
            adapter: "lsilogic",
            system_type: "vmx-07".into(),
        };
        let d = Descriptor::parse(env.to_xml().as_bytes()).unwrap();
        assert_eq!(d.virtual_systems, 1);
        assert_eq!(
            d.files,
            vec![FileRef {
                id: "file1".into(),
                href: "x-disk1.vmdk".into(),
                size: Some(12345),
                compression: None,
                chunk_size: None
            }]
        );
        assert_eq!(d.disks[0].capacity, Some(1 << 30));
        assert_eq!(d.disks[0].populated_size, Some(4096));
        assert_eq!(d.disks[0].file_ref.as_deref(), Some("file1"));
    }

    #[test]
    fn units_and_refusals() {
        assert_eq!(allocation_units("byte * 2^30"), Some(1 << 30));
        assert_eq!(allocation_units("byte*2^20"), Some(1 << 20));
        assert_eq!(allocation_units("byte * 2^64"), None);
        let x = br#"<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaa">]><Envelope/>"#;
        assert_eq!(
            Descriptor::parse(x).unwrap_err().kind(),
            crate::error::ErrorKind::Unsupported
        );
        let x = br#"<Envelope><DiskSection><Disk ovf:diskId="d" ovf:capacity="4" ovf:capacityAllocationUnits="byte * 2^62"/></DiskSection></Envelope>"#;
        assert!(Descriptor::parse(x).is_err());
        assert!(Descriptor::parse(b"<Other/>").is_err());
    }
}
