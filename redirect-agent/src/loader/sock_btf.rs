//! Offsets of the `struct sock` fields `PROG_TCP_CONNECT` reads, found in the kernel's BTF.
//!
//! Rust eBPF programs cannot carry CO-RE relocations, so the agent relocates by hand: it finds
//! `struct sock` in `/sys/kernel/btf/vmlinux`, descends into `__sk_common` (and its anonymous
//! unions and structs) and hands the byte offsets to the program as [`SockOffsets`].
//!
//! The parser is minimal (aya's `Btf` keeps its type accessors private): little-endian only,
//! just enough to walk struct members. Every read is bounds-checked, so a malformed blob is an
//! error naming the problem, never a panic; nesting is bounded, so a cycle is an error too.

use redirect_common::SockOffsets;

/// Where the kernel's BTF is.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// Reads [`VMLINUX_BTF`] and finds the offsets. Errors name the file and the reason.
pub fn from_kernel() -> Result<SockOffsets, String> {
    let btf = std::fs::read(VMLINUX_BTF).map_err(|e| format!("{VMLINUX_BTF}: {e}"))?;
    sock_offsets(&btf).map_err(|e| format!("{VMLINUX_BTF}: {e}"))
}

/// The offsets from raw BTF bytes (pure: unit-tested).
pub fn sock_offsets(btf: &[u8]) -> Result<SockOffsets, String> {
    let btf = Btf::parse(btf)?;
    let sock = btf.find_struct("sock")?;
    let common = btf.member(sock, "__sk_common")?;
    let common_id = btf.resolve(common.type_id)?;
    let field = |name: &str, size: u64| -> Result<u32, String> {
        let f = btf.member(common_id, name)?;
        let actual = btf.size_of(f.type_id, 0)?;
        if actual != size {
            return Err(format!(
                "__sk_common.{name} is {actual} bytes, expected {size}"
            ));
        }
        byte_offset(common.bit_offset + f.bit_offset, name)
    };
    Ok(SockOffsets {
        ready: 1,
        family: field("skc_family", 2)?,
        rcv_saddr: field("skc_rcv_saddr", 4)?,
        num: field("skc_num", 2)?,
        v6_rcv_saddr: field("skc_v6_rcv_saddr", 16)?,
        dport: field("skc_dport", 2)?,
        router_dport4: 0,
        router_dport6: 0,
    })
}

/// `btf_header.magic` as read little-endian; the byte-swapped value means big-endian BTF.
const MAGIC: u16 = 0xeb9f;
/// `sizeof(struct btf_header)`: `hdr_len` may be larger (newer headers), never smaller.
const HEADER_LEN: usize = 24;
/// Size of `struct btf_type`, before each kind's trailing data.
const TYPE_LEN: usize = 12;
/// Bound on anonymous-member nesting and modifier chains: kernels need a handful, and a cycle
/// in malformed input must end in an error rather than a stack overflow or endless loop.
const MAX_DEPTH: usize = 32;

const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FWD: u32 = 7;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_FLOAT: u32 = 16;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

/// The parsed blob: the string section and every type, indexed by id - 1 (id 0 is void).
struct Btf<'a> {
    strings: &'a [u8],
    types: Vec<Type<'a>>,
}

/// One `struct btf_type` with its kind-specific trailing data.
#[derive(Clone, Copy)]
struct Type<'a> {
    name_off: u32,
    kind: u32,
    vlen: usize,
    kind_flag: bool,
    /// `size` for INT/STRUCT/UNION/ENUM…, `type` for modifiers, typedefs and the like.
    size_or_type: u32,
    extra: &'a [u8],
}

/// A member found in a struct: its bit offset from the start of the struct searched.
#[derive(Clone, Copy, Debug)]
struct Field {
    bit_offset: u64,
    type_id: u32,
}

impl<'a> Btf<'a> {
    fn parse(btf: &'a [u8]) -> Result<Self, String> {
        let (strings, types) = sections(btf)?;
        Ok(Btf {
            strings,
            types: parse_types(types)?,
        })
    }

    fn get(&self, id: u32) -> Result<&Type<'a>, String> {
        let index = usize::try_from(id)
            .ok()
            .and_then(|id| id.checked_sub(1))
            .ok_or("type id 0 (void) where a type is needed")?;
        self.types
            .get(index)
            .ok_or_else(|| format!("type id {id} out of range ({} types)", self.types.len()))
    }

    /// The NUL-terminated string at `off` in the string section.
    fn name(&self, off: u32) -> Result<&'a [u8], String> {
        let tail = usize::try_from(off)
            .ok()
            .and_then(|off| self.strings.get(off..))
            .ok_or_else(|| format!("string offset {off} past the end of the string section"))?;
        let end = tail
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| format!("string at offset {off} is not NUL-terminated"))?;
        Ok(tail.get(..end).unwrap_or_default())
    }

    /// The first complete (non-forward) struct called `name`.
    fn find_struct(&self, name: &str) -> Result<u32, String> {
        for (index, ty) in self.types.iter().enumerate() {
            if ty.kind == KIND_STRUCT && self.name(ty.name_off)? == name.as_bytes() {
                return u32::try_from(index + 1).map_err(|_| "too many types".to_string());
            }
        }
        Err(format!("no struct {name} in the BTF"))
    }

    /// Member `name` of struct/union `id`, looking into anonymous members.
    fn member(&self, id: u32, name: &str) -> Result<Field, String> {
        self.find_member(id, name.as_bytes(), 0)?.ok_or_else(|| {
            let owner = self.get(id).and_then(|ty| self.name(ty.name_off));
            let owner = owner.map(String::from_utf8_lossy).unwrap_or_default();
            format!("struct {owner} has no member {name}")
        })
    }

    fn find_member(&self, id: u32, name: &[u8], depth: usize) -> Result<Option<Field>, String> {
        if depth > MAX_DEPTH {
            return Err(format!("anonymous members nested deeper than {MAX_DEPTH}"));
        }
        let ty = self.get(id)?;
        if ty.kind != KIND_STRUCT && ty.kind != KIND_UNION {
            return Err(format!(
                "type id {id} is {}, not a struct",
                kind_name(ty.kind)
            ));
        }
        for i in 0..ty.vlen {
            let m =
                member_at(ty, i).ok_or_else(|| format!("type id {id}: member {i} truncated"))?;
            if m.name_off == 0 {
                let inner = self.resolve(m.type_id)?;
                let inner_kind = self.get(inner)?.kind;
                if (inner_kind == KIND_STRUCT || inner_kind == KIND_UNION)
                    && let Some(f) = self.find_member(inner, name, depth + 1)?
                {
                    return Ok(Some(Field {
                        bit_offset: m.bit_offset + f.bit_offset,
                        type_id: f.type_id,
                    }));
                }
            } else if self.name(m.name_off)? == name {
                if m.bitfield_size != 0 {
                    let name = String::from_utf8_lossy(name);
                    return Err(format!("member {name} is a bitfield"));
                }
                return Ok(Some(Field {
                    bit_offset: m.bit_offset,
                    type_id: m.type_id,
                }));
            }
        }
        Ok(None)
    }

    /// `id` with typedefs and qualifiers peeled off.
    fn resolve(&self, mut id: u32) -> Result<u32, String> {
        for _ in 0..MAX_DEPTH {
            let ty = self.get(id)?;
            match ty.kind {
                KIND_TYPEDEF | KIND_CONST | KIND_VOLATILE | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = ty.size_or_type;
                }
                _ => return Ok(id),
            }
        }
        Err(format!(
            "type chain longer than {MAX_DEPTH} (a cycle?) at type id {id}"
        ))
    }

    /// Byte size of a field's type: only what the fields we read can be.
    fn size_of(&self, id: u32, depth: usize) -> Result<u64, String> {
        if depth > MAX_DEPTH {
            return Err(format!("arrays nested deeper than {MAX_DEPTH}"));
        }
        let id = self.resolve(id)?;
        let ty = self.get(id)?;
        match ty.kind {
            KIND_INT | KIND_STRUCT | KIND_UNION => Ok(u64::from(ty.size_or_type)),
            KIND_ARRAY => {
                let (elem, nelems) = u32_at(ty.extra, 0)
                    .zip(u32_at(ty.extra, 8))
                    .ok_or_else(|| format!("type id {id}: array truncated"))?;
                let elem_size = self.size_of(elem, depth + 1)?;
                elem_size
                    .checked_mul(u64::from(nelems))
                    .ok_or_else(|| format!("type id {id}: array size overflows"))
            }
            kind => Err(format!("type id {id} is {}: no size", kind_name(kind))),
        }
    }
}

/// A `struct btf_member` decoded with its struct's `kind_flag`.
struct Member {
    name_off: u32,
    type_id: u32,
    bit_offset: u64,
    bitfield_size: u32,
}

/// Member `i` of a struct/union; with `kind_flag`, the offset packs the bitfield size in its
/// high 8 bits.
fn member_at(ty: &Type<'_>, i: usize) -> Option<Member> {
    let at = i.checked_mul(12)?;
    let offset = u32_at(ty.extra, at.checked_add(8)?)?;
    let (bit_offset, bitfield_size) = if ty.kind_flag {
        (offset & 0x00ff_ffff, offset >> 24)
    } else {
        (offset, 0)
    };
    Some(Member {
        name_off: u32_at(ty.extra, at)?,
        type_id: u32_at(ty.extra, at.checked_add(4)?)?,
        bit_offset: u64::from(bit_offset),
        bitfield_size,
    })
}

/// Checks the header and returns the string and type sections.
fn sections(btf: &[u8]) -> Result<(&[u8], &[u8]), String> {
    let magic = u16_at(btf, 0).ok_or_else(|| truncated_header(btf.len()))?;
    if magic == MAGIC.swap_bytes() {
        return Err("big-endian BTF is not supported (only little-endian)".into());
    }
    if magic != MAGIC {
        return Err(format!("bad magic {magic:#06x}, expected {MAGIC:#06x}"));
    }
    let field = |at: usize| u32_at(btf, at).ok_or_else(|| truncated_header(btf.len()));
    let version = btf.get(2).copied().unwrap_or_default();
    if version != 1 {
        return Err(format!("unsupported BTF version {version}"));
    }
    let hdr_len = field(4)?;
    let (type_off, type_len, str_off, str_len) = (field(8)?, field(12)?, field(16)?, field(20)?);
    let body = usize::try_from(hdr_len)
        .ok()
        .filter(|&len| len >= HEADER_LEN)
        .ok_or_else(|| format!("header length {hdr_len} shorter than {HEADER_LEN}"))?;
    let body = btf
        .get(body..)
        .ok_or_else(|| format!("header length {hdr_len} past the end ({} bytes)", btf.len()))?;
    let types = section(body, "type", type_off, type_len)?;
    let strings = section(body, "string", str_off, str_len)?;
    Ok((strings, types))
}

fn truncated_header(len: usize) -> String {
    format!("truncated header: {len} bytes, need {HEADER_LEN}")
}

/// `len` bytes at `off` after the header.
fn section<'a>(body: &'a [u8], name: &str, off: u32, len: u32) -> Result<&'a [u8], String> {
    let range = usize::try_from(off).ok().zip(usize::try_from(len).ok());
    range
        .and_then(|(off, len)| body.get(off..off.checked_add(len)?))
        .ok_or_else(|| {
            format!(
                "{name} section ({len} bytes at {off}) runs past the end of the data ({} bytes)",
                body.len()
            )
        })
}

/// Every type in the type section, each with its trailing data.
fn parse_types(section: &[u8]) -> Result<Vec<Type<'_>>, String> {
    let mut types = Vec::new();
    let mut pos = 0;
    while pos < section.len() {
        let id = types.len() + 1;
        let truncated = || format!("type id {id} at type-section offset {pos} is truncated");
        let (name_off, info, size_or_type) = u32_at(section, pos)
            .zip(u32_at(section, pos + 4))
            .zip(u32_at(section, pos + 8))
            .map(|((a, b), c)| (a, b, c))
            .ok_or_else(truncated)?;
        let kind = (info >> 24) & 0x1f;
        let vlen = usize::from(info as u16);
        let extra_len =
            extra_len(kind, vlen).ok_or_else(|| format!("type id {id}: unknown kind {kind}"))?;
        let start = pos + TYPE_LEN;
        let extra = section
            .get(start..start + extra_len)
            .ok_or_else(truncated)?;
        types.push(Type {
            name_off,
            kind,
            vlen,
            kind_flag: info >> 31 == 1,
            size_or_type,
            extra,
        });
        pos = start + extra_len;
    }
    Ok(types)
}

/// Bytes after `struct btf_type` for `kind`; `None` for a kind this parser does not know.
fn extra_len(kind: u32, vlen: usize) -> Option<usize> {
    Some(match kind {
        KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
        KIND_ARRAY => 12,
        KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => 12 * vlen,
        KIND_ENUM | KIND_FUNC_PROTO => 8 * vlen,
        KIND_PTR | KIND_FWD | KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT
        | KIND_FUNC | KIND_FLOAT | KIND_TYPE_TAG => 0,
        _ => return None,
    })
}

fn kind_name(kind: u32) -> String {
    let name = match kind {
        KIND_INT => "INT",
        KIND_PTR => "PTR",
        KIND_ARRAY => "ARRAY",
        KIND_STRUCT => "STRUCT",
        KIND_UNION => "UNION",
        KIND_ENUM => "ENUM",
        KIND_FWD => "FWD",
        KIND_TYPEDEF => "TYPEDEF",
        KIND_VOLATILE => "VOLATILE",
        KIND_CONST => "CONST",
        KIND_RESTRICT => "RESTRICT",
        KIND_FUNC => "FUNC",
        KIND_FUNC_PROTO => "FUNC_PROTO",
        KIND_VAR => "VAR",
        KIND_DATASEC => "DATASEC",
        KIND_FLOAT => "FLOAT",
        KIND_DECL_TAG => "DECL_TAG",
        KIND_TYPE_TAG => "TYPE_TAG",
        KIND_ENUM64 => "ENUM64",
        _ => return format!("kind {kind}"),
    };
    name.to_string()
}

/// The byte offset of a field, which must sit on a byte boundary to be read with a plain load.
fn byte_offset(bits: u64, name: &str) -> Result<u32, String> {
    if !bits.is_multiple_of(8) {
        return Err(format!(
            "__sk_common.{name} is not on a byte boundary (bit {bits})"
        ));
    }
    u32::try_from(bits / 8).map_err(|_| format!("__sk_common.{name} offset {bits} bits too large"))
}

fn u16_at(buf: &[u8], at: usize) -> Option<u16> {
    let bytes = buf.get(at..at.checked_add(2)?)?;
    Some(u16::from_le_bytes(bytes.try_into().ok()?))
}

fn u32_at(buf: &[u8], at: usize) -> Option<u32> {
    let bytes = buf.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes(bytes.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds BTF blobs: strings and types appended in order, ids handed out from 1.
    struct Builder {
        strings: Vec<u8>,
        types: Vec<u8>,
        next_id: u32,
    }

    impl Builder {
        fn new() -> Self {
            Builder {
                strings: vec![0],
                types: Vec::new(),
                next_id: 1,
            }
        }

        fn str(&mut self, s: &str) -> u32 {
            if s.is_empty() {
                return 0;
            }
            let off = self.strings.len() as u32;
            self.strings.extend_from_slice(s.as_bytes());
            self.strings.push(0);
            off
        }

        fn push_u32s(&mut self, words: &[u32]) {
            for w in words {
                self.types.extend_from_slice(&w.to_le_bytes());
            }
        }

        /// Any type: header fields and trailing words.
        fn raw(
            &mut self,
            kind: u32,
            name: &str,
            vlen: u32,
            kflag: bool,
            st: u32,
            extra: &[u32],
        ) -> u32 {
            let name_off = self.str(name);
            let info = (u32::from(kflag) << 31) | (kind << 24) | vlen;
            self.push_u32s(&[name_off, info, st]);
            self.push_u32s(extra);
            self.next_id += 1;
            self.next_id - 1
        }

        fn int(&mut self, name: &str, size: u32) -> u32 {
            self.raw(KIND_INT, name, 0, false, size, &[size * 8])
        }

        fn wrap(&mut self, kind: u32, name: &str, ty: u32) -> u32 {
            self.raw(kind, name, 0, false, ty, &[])
        }

        fn array(&mut self, elem: u32, index: u32, n: u32) -> u32 {
            self.raw(KIND_ARRAY, "", 0, false, 0, &[elem, index, n])
        }

        /// Members: (name, type, bit offset, bitfield size); the size goes in the high bits
        /// when `kflag` is set.
        fn composite(
            &mut self,
            kind: u32,
            name: &str,
            size: u32,
            kflag: bool,
            members: &[(&str, u32, u32, u32)],
        ) -> u32 {
            let mut words = Vec::new();
            for &(m, ty, bits, bitfield) in members {
                let off = if kflag { (bitfield << 24) | bits } else { bits };
                words.extend([self.str(m), ty, off]);
            }
            self.raw(kind, name, members.len() as u32, kflag, size, &words)
        }

        fn build(&self) -> Vec<u8> {
            let mut out = Vec::new();
            let header = [
                u32::from(MAGIC) | (1 << 16), // magic, version 1, flags 0
                HEADER_LEN as u32,
                0,
                self.types.len() as u32,
                self.types.len() as u32,
                self.strings.len() as u32,
            ];
            for w in header {
                out.extend_from_slice(&w.to_le_bytes());
            }
            out.extend_from_slice(&self.types);
            out.extend_from_slice(&self.strings);
            out
        }
    }

    /// Options for the synthetic kernel: what breaks.
    #[derive(Default)]
    struct Variant {
        no_sock: bool,
        num_size: u32,
        family_bit: u32,
    }

    /// A kernel-like `struct sock` with `__sk_common` at byte 8, so every expected offset is
    /// the real-kernel one plus 8: family 24, rcv_saddr 12, num 22, v6_rcv_saddr 80.
    fn synthetic(v: Variant) -> Vec<u8> {
        let mut b = Builder::new();
        // Kinds the walk must skip correctly before anything interesting.
        b.raw(KIND_ENUM, "e", 2, false, 4, &[0, 1, 0, 2]);
        b.raw(KIND_ENUM64, "e64", 1, false, 8, &[0, 1, 0]);
        let u8_t = b.int("unsigned char", 1);
        b.raw(KIND_FUNC_PROTO, "", 2, false, u8_t, &[0, u8_t, 0, u8_t]);
        b.raw(KIND_VAR, "v", 0, false, u8_t, &[1]);
        b.raw(KIND_DATASEC, ".data", 1, false, 8, &[5, 0, 1]);
        b.raw(KIND_FLOAT, "float", 0, false, 4, &[]);
        b.raw(KIND_DECL_TAG, "tag", 0, false, u8_t, &[u32::MAX]);
        b.raw(KIND_FWD, "sock", 0, false, 0, &[]);
        let u16_t = b.int("unsigned short", 2);
        let u32_t = b.int("unsigned int", 4);
        let u64_t = b.int("long long unsigned int", 8);
        let num_t = if v.num_size == 0 {
            u16_t
        } else {
            b.int("odd", v.num_size)
        };
        let be32 = b.wrap(KIND_TYPEDEF, "__be32", u32_t);
        let be32 = b.wrap(KIND_TYPE_TAG, "user", be32);
        let c_u16 = b.wrap(KIND_CONST, "", u16_t);
        let family_t = b.wrap(KIND_VOLATILE, "", c_u16);
        let ptr = b.wrap(KIND_PTR, "", u8_t);
        let bytes16 = b.array(u8_t, u32_t, 16);
        let words4 = b.array(u32_t, u32_t, 4);
        let in6_u = b.composite(
            KIND_UNION,
            "",
            16,
            false,
            &[("u6_addr8", bytes16, 0, 0), ("u6_addr32", words4, 0, 0)],
        );
        let in6 = b.composite(
            KIND_STRUCT,
            "in6_addr",
            16,
            false,
            &[("in6_u", in6_u, 0, 0)],
        );
        let addrs = b.composite(
            KIND_STRUCT,
            "",
            8,
            false,
            &[("skc_daddr", be32, 0, 0), ("skc_rcv_saddr", be32, 32, 0)],
        );
        let addr_u = b.composite(
            KIND_UNION,
            "",
            8,
            false,
            &[("skc_addrpair", u64_t, 0, 0), ("", addrs, 0, 0)],
        );
        let ports = b.composite(
            KIND_STRUCT,
            "",
            4,
            false,
            &[("skc_dport", u16_t, 0, 0), ("skc_num", num_t, 16, 0)],
        );
        let ports = b.wrap(KIND_CONST, "", ports);
        let port_u = b.composite(
            KIND_UNION,
            "",
            4,
            false,
            &[("skc_portpair", u32_t, 0, 0), ("", ports, 0, 0)],
        );
        let family_bit = if v.family_bit == 0 { 128 } else { v.family_bit };
        let common = b.composite(
            KIND_STRUCT,
            "sock_common",
            136,
            true,
            &[
                ("", addr_u, 0, 0),
                ("skc_hash", u32_t, 64, 0),
                ("", port_u, 96, 0),
                ("skc_family", family_t, family_bit, 0),
                ("skc_state", u8_t, 144, 0),
                ("skc_reuse", u8_t, 152, 4),
                ("skc_reuseport", u8_t, 156, 1),
                ("skc_prot", ptr, 192, 0),
                ("skc_v6_daddr", in6, 448, 0),
                ("skc_v6_rcv_saddr", in6, 576, 0),
            ],
        );
        let common_t = b.wrap(KIND_TYPEDEF, "sock_common_t", common);
        let name = if v.no_sock { "not_sock" } else { "sock" };
        b.composite(
            KIND_STRUCT,
            name,
            200,
            false,
            &[("sk_pad", u64_t, 0, 0), ("__sk_common", common_t, 64, 0)],
        );
        b.build()
    }

    fn expect_err(btf: &[u8], needle: &str) {
        match sock_offsets(btf) {
            Ok(o) => panic!("expected an error containing {needle:?}, got {o:?}"),
            Err(e) => assert!(
                e.contains(needle),
                "error {e:?} does not contain {needle:?}"
            ),
        }
    }

    fn set_u32(blob: &mut [u8], at: usize, value: u32) {
        blob[at..at + 4].copy_from_slice(&value.to_le_bytes());
    }

    #[test]
    fn running_kernel() {
        let btf = match std::fs::read(VMLINUX_BTF) {
            Ok(btf) => btf,
            Err(e) => {
                eprintln!("SKIP running_kernel: {VMLINUX_BTF}: {e}");
                return;
            }
        };
        let o = sock_offsets(&btf).unwrap();
        eprintln!("{VMLINUX_BTF}: {o:?}");
        assert_eq!(
            (o.ready, o.family, o.rcv_saddr, o.num, o.dport),
            (1, 16, 4, 14, redirect_common::SOCK_DPORT_OFFSET as u32)
        );
        assert!(
            o.v6_rcv_saddr > 16 && o.v6_rcv_saddr.is_multiple_of(4),
            "{o:?}"
        );
        assert_eq!(from_kernel().unwrap(), o);
    }

    #[test]
    fn synthetic_offsets_add_up() {
        let o = sock_offsets(&synthetic(Variant::default())).unwrap();
        let expected = SockOffsets {
            ready: 1,
            family: 24,
            rcv_saddr: 12,
            num: 22,
            v6_rcv_saddr: 80,
            dport: 20,
            router_dport4: 0,
            router_dport6: 0,
        };
        assert_eq!(o, expected);
    }

    #[test]
    fn header_errors() {
        let good = synthetic(Variant::default());
        let mut bad = good.clone();
        bad[0] = 0;
        expect_err(&bad, "bad magic");
        let mut be = good.clone();
        be[..2].copy_from_slice(&MAGIC.to_be_bytes());
        expect_err(&be, "big-endian");
        expect_err(&good[..10], "truncated header");
        expect_err(&good[..1], "truncated header");
        let mut short_hdr = good.clone();
        set_u32(&mut short_hdr, 4, 8);
        expect_err(&short_hdr, "header length 8");
    }

    #[test]
    fn section_past_end() {
        let good = synthetic(Variant::default());
        let mut bad = good.clone();
        set_u32(&mut bad, 12, u32::MAX - 4); // type_len
        expect_err(&bad, "type section");
        let mut bad = good.clone();
        set_u32(&mut bad, 16, u32::MAX); // str_off
        expect_err(&bad, "string section");
    }

    #[test]
    fn missing_sock_and_wrong_size() {
        expect_err(
            &synthetic(Variant {
                no_sock: true,
                ..Variant::default()
            }),
            "no struct sock",
        );
        expect_err(
            &synthetic(Variant {
                num_size: 4,
                ..Variant::default()
            }),
            "skc_num is 4 bytes, expected 2",
        );
        expect_err(
            &synthetic(Variant {
                family_bit: 129,
                ..Variant::default()
            }),
            "not on a byte boundary",
        );
    }

    #[test]
    fn unknown_kind_and_missing_member() {
        let mut b = Builder::new();
        b.raw(25, "x", 0, false, 0, &[]);
        expect_err(&b.build(), "unknown kind 25");

        let mut b = Builder::new();
        let u16_t = b.int("unsigned short", 2);
        let common = b.composite(
            KIND_STRUCT,
            "sock_common",
            2,
            false,
            &[("skc_family", u16_t, 0, 0)],
        );
        b.composite(
            KIND_STRUCT,
            "sock",
            2,
            false,
            &[("__sk_common", common, 0, 0)],
        );
        expect_err(&b.build(), "struct sock_common has no member skc_rcv_saddr");
    }

    #[test]
    fn cycles_are_errors() {
        let mut b = Builder::new();
        // A typedef naming itself, used as __sk_common's type.
        let t = b.wrap(KIND_TYPEDEF, "loop", 1);
        b.composite(KIND_STRUCT, "sock", 8, false, &[("__sk_common", t, 0, 0)]);
        expect_err(&b.build(), "cycle");
    }

    #[test]
    fn truncation_never_panics() {
        let good = synthetic(Variant::default());
        for cut in 0..good.len() {
            let mut blob = good[..cut].to_vec();
            assert!(sock_offsets(&blob).is_err(), "cut {cut}");
            // Also keep the header claiming the full lengths but shrink the sections.
            if blob.len() >= HEADER_LEN {
                let body = (blob.len() - HEADER_LEN) as u32;
                set_u32(
                    &mut blob,
                    12,
                    body.min(u32::from_le_bytes(good[12..16].try_into().unwrap())),
                );
                set_u32(&mut blob, 16, body.saturating_sub(1));
                set_u32(&mut blob, 20, 1.min(body));
                let _ = sock_offsets(&blob);
            }
        }
        if let Ok(real) = std::fs::read(VMLINUX_BTF) {
            let step = real.len() / 40 + 1;
            for cut in (0..real.len()).step_by(step) {
                let _ = sock_offsets(&real[..cut]);
            }
        }
    }

    #[test]
    fn corrupting_any_byte_never_panics() {
        let good = synthetic(Variant::default());
        for at in 0..good.len() {
            for value in [0x00, 0x01, 0x1f, 0x80, 0xff] {
                let mut blob = good.clone();
                blob[at] = value;
                let _ = sock_offsets(&blob);
            }
        }
    }
}
