//! The few `bpf()` commands aya does not offer on pinned links: open a pin, read a link's
//! cgroup, and swap a link's program in place.

use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
};

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;

fn bpf(cmd: libc::c_long, attr: &mut [u64; 16]) -> io::Result<i64> {
    // SAFETY: `attr` is a zeroed 128-byte buffer, larger than any bpf_attr variant used here.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            std::mem::size_of_val(attr) as u32,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Opens a pinned object.
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path with NUL"))?;
    let mut attr = [0u64; 16];
    attr[0] = c.as_ptr() as u64;
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: the kernel returned a new file descriptor we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Program id and attach cgroup id of a cgroup link.
pub fn cgroup_link_info(link: &OwnedFd) -> io::Result<(u32, u64)> {
    // struct bpf_link_info: type, id, prog_id (u32 each), then the cgroup arm at offset 16.
    let mut info = [0u64; 12];
    let mut attr = [0u64; 16];
    attr[0] = link.as_raw_fd() as u64 | ((std::mem::size_of_val(&info) as u64) << 32);
    attr[1] = info.as_mut_ptr() as u64;
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    let prog_id = (info[1] & 0xffff_ffff) as u32;
    Ok((prog_id, info[2]))
}

/// Looks up `key` and deletes it in one call (hash maps, kernel >= 5.14). `Ok(false)` when the
/// key is not there.
pub fn map_lookup_and_delete(map: &OwnedFd, key: &[u8], value: &mut [u8]) -> io::Result<bool> {
    key_call(BPF_MAP_LOOKUP_AND_DELETE_ELEM, map, key, Some(value))
}

/// A map command on one key (copying its value out when `value` is given); `Ok(false)` when
/// the key is not there.
fn key_call(
    cmd: libc::c_long,
    map: &OwnedFd,
    key: &[u8],
    value: Option<&mut [u8]>,
) -> io::Result<bool> {
    let mut attr = [0u64; 16];
    attr[0] = map.as_raw_fd() as u64;
    attr[1] = key.as_ptr() as u64;
    attr[2] = value.map_or(0, |v| v.as_mut_ptr() as u64);
    match bpf(cmd, &mut attr) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Looks `key` up in any map. `Ok(false)` when the key is not there.
pub fn map_lookup(map: &OwnedFd, key: &[u8], value: &mut [u8]) -> io::Result<bool> {
    key_call(BPF_MAP_LOOKUP_ELEM, map, key, Some(value))
}

/// Deletes `key` from a map. `Ok(false)` when the key is not there.
pub fn map_delete(map: &OwnedFd, key: &[u8]) -> io::Result<bool> {
    key_call(BPF_MAP_DELETE_ELEM, map, key, None)
}

/// Atomically replaces the program a link runs.
pub fn link_update(link: &OwnedFd, prog_fd: i32) -> io::Result<()> {
    let mut attr = [0u64; 16];
    attr[0] = link.as_raw_fd() as u64 | ((prog_fd as u32 as u64) << 32);
    bpf(BPF_LINK_UPDATE, &mut attr).map(|_| ())
}

/// `bpf_link_info.type` of a tracing link, as `fentry` makes (`BPF_LINK_TYPE_TRACING`).
pub const LINK_TYPE_TRACING: u32 = 2;
/// `bpf_link_info.type` of a cgroup link (`BPF_LINK_TYPE_CGROUP`).
pub const LINK_TYPE_CGROUP: u32 = 3;

/// What `BPF_OBJ_GET_INFO_BY_FD` tells about a link: a cgroup link, or the `fentry` record
/// hook's tracing link (no cgroup).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkInfo {
    pub link_type: u32,
    pub link_id: u32,
    pub prog_id: u32,
    /// The cgroup of a cgroup link; 0 for any other link.
    pub cgroup_id: u64,
    pub attach_type: u32,
}

/// Link type, link id, program id, attach cgroup and attach type of a link.
pub fn link_details(link: &OwnedFd) -> io::Result<LinkInfo> {
    // struct bpf_link_info: type, id, prog_id (u32 each), then the cgroup arm at offset 16:
    // cgroup_id (u64), attach_type (u32); a tracing link's arm starts with attach_type.
    let mut info = [0u64; 12];
    let mut attr = [0u64; 16];
    attr[0] = link.as_raw_fd() as u64 | ((std::mem::size_of_val(&info) as u64) << 32);
    attr[1] = info.as_mut_ptr() as u64;
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    let link_type = (info[0] & 0xffff_ffff) as u32;
    let cgroup = link_type == LINK_TYPE_CGROUP;
    Ok(LinkInfo {
        link_type,
        link_id: (info[0] >> 32) as u32,
        prog_id: (info[1] & 0xffff_ffff) as u32,
        cgroup_id: if cgroup { info[2] } else { 0 },
        attach_type: if cgroup {
            (info[3] & 0xffff_ffff) as u32
        } else {
            (info[2] & 0xffff_ffff) as u32
        },
    })
}

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_PROG_TYPE_SCHED_CLS: u64 = 3;
const BPF_FUNC_MAP_LOOKUP_ELEM: i32 = 1;
const BPF_FUNC_SK_RELEASE: i32 = 86;

/// One eBPF instruction, encoded as the kernel's `struct bpf_insn`.
const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
    code as u64
        | ((dst as u64 | ((src as u64) << 4)) << 8)
        | ((off as u16 as u64) << 16)
        | ((imm as u32 as u64) << 32)
}

/// Instructions that look `slot` up in the sockmap `map_fd` exactly as `connect4` does
/// (`bpf_map_lookup_elem` + `bpf_sk_release`) and set `bit` in r6 when a socket is there.
fn probe_slot(map_fd: i32, slot: i32, bit: i32) -> [u64; 10] {
    [
        insn(0x62, 10, 0, -4, slot),                   // *(u32 *)(r10 - 4) = slot
        insn(0x18, 1, 1, 0, map_fd),                   // r1 = map (ld_imm64, pseudo map fd)
        0,                                             //   (upper half of the 64-bit immediate)
        insn(0xbf, 2, 10, 0, 0),                       // r2 = r10
        insn(0x07, 2, 0, 0, -4),                       // r2 += -4
        insn(0x85, 0, 0, 0, BPF_FUNC_MAP_LOOKUP_ELEM), // r0 = lookup(r1, r2)
        insn(0x15, 0, 0, 3, 0),                        // if r0 == 0 goto +3
        insn(0xbf, 1, 0, 0, 0),                        // r1 = r0
        insn(0x85, 0, 0, 0, BPF_FUNC_SK_RELEASE),      // sk_release(r1)
        insn(0x47, 6, 0, 0, bit),                      // r6 |= bit
    ]
}

/// Which of the first two slots of a sockmap hold a socket (bit 0: slot 0, bit 1: slot 1).
///
/// Userspace cannot ask this directly: a lookup from userspace on a sockmap whose value size is
/// 4 bytes fails with ENOSPC whether or not the slot is occupied. So a 23-instruction program
/// does the lookup the way `connect4` does, run once with `BPF_PROG_TEST_RUN` (nothing is
/// attached or pinned; the program is freed when this returns).
pub fn sockmap_occupied(map: &impl AsRawFd) -> io::Result<u32> {
    let fd = map.as_raw_fd();
    let mut prog = vec![insn(0xb7, 6, 0, 0, 0)]; // r6 = 0
    prog.extend(probe_slot(fd, 0, 1));
    prog.extend(probe_slot(fd, 1, 2));
    prog.push(insn(0xbf, 0, 6, 0, 0)); // r0 = r6
    prog.push(insn(0x95, 0, 0, 0, 0)); // exit
    let license = c"GPL";
    let mut attr = [0u64; 16];
    attr[0] = BPF_PROG_TYPE_SCHED_CLS | ((prog.len() as u64) << 32);
    attr[1] = prog.as_ptr() as u64;
    attr[2] = license.as_ptr() as u64;
    let prog_fd = bpf(BPF_PROG_LOAD, &mut attr)?;
    // SAFETY: the kernel returned a new file descriptor we now own.
    let prog_fd = unsafe { OwnedFd::from_raw_fd(prog_fd as i32) };
    // A zeroed Ethernet header is the smallest packet a tc test run accepts.
    let packet = [0u8; 14];
    let mut attr = [0u64; 16];
    attr[0] = prog_fd.as_raw_fd() as u64;
    attr[1] = packet.len() as u64;
    attr[2] = packet.as_ptr() as u64;
    bpf(BPF_PROG_TEST_RUN, &mut attr)?;
    Ok((attr[0] >> 32) as u32)
}

const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;

/// Number of keys of a hash map (walks `BPF_MAP_GET_NEXT_KEY`; keys up to 64 bytes). Bounded by
/// `max`: a key deleted during the walk restarts it from the first key.
pub fn count_keys(map: std::os::fd::BorrowedFd<'_>, max: u64) -> u64 {
    let mut cur = [0u8; 64];
    let mut next = [0u8; 64];
    let mut n = 0u64;
    let mut first = true;
    loop {
        let mut attr = [0u64; 16];
        attr[0] = map.as_raw_fd() as u64;
        attr[1] = if first { 0 } else { cur.as_ptr() as u64 };
        attr[2] = next.as_mut_ptr() as u64;
        if n >= max || bpf(BPF_MAP_GET_NEXT_KEY, &mut attr).is_err() {
            return n;
        }
        n += 1;
        first = false;
        cur = next;
    }
}

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_OBJ_PIN: libc::c_long = 6;
/// `BPF_MAP_TYPE_ARRAY`.
pub const MAP_TYPE_ARRAY: u32 = 2;

/// Creates an array map of `max_entries` values of `value_size` bytes (u32 keys), named `name`
/// (up to 15 bytes) for `bpftool map show`.
pub fn array_create(name: &str, value_size: u32, max_entries: u32) -> io::Result<OwnedFd> {
    let mut attr = [0u64; 16];
    attr[0] = MAP_TYPE_ARRAY as u64 | (4u64 << 32);
    attr[1] = value_size as u64 | ((max_entries as u64) << 32);
    // map_name (char[16]) starts at byte 28 of the attribute union.
    let mut bytes = [0u8; 128];
    for (i, w) in attr.iter().enumerate() {
        bytes[i * 8..i * 8 + 8].copy_from_slice(&w.to_ne_bytes());
    }
    for (i, b) in name.bytes().take(15).enumerate() {
        bytes[28 + i] = b;
    }
    for (i, w) in attr.iter_mut().enumerate() {
        let mut word = [0u8; 8];
        word.copy_from_slice(&bytes[i * 8..i * 8 + 8]);
        *w = u64::from_ne_bytes(word);
    }
    let fd = bpf(BPF_MAP_CREATE, &mut attr)?;
    // SAFETY: the kernel returned a new file descriptor we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Writes `value` (exactly the map's value size) at index `key` of an array map.
pub fn array_update(map: &OwnedFd, key: u32, value: &[u8]) -> io::Result<()> {
    let mut attr = [0u64; 16];
    attr[0] = map.as_raw_fd() as u64;
    attr[1] = &key as *const u32 as u64;
    attr[2] = value.as_ptr() as u64;
    bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map(|_| ())
}

/// Reads index `key` of an array map into `value` (exactly the map's value size).
pub fn array_lookup(map: &OwnedFd, key: u32, value: &mut [u8]) -> io::Result<()> {
    if map_lookup(map, &key.to_ne_bytes(), value)? {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(libc::ENOENT))
    }
}

/// Pins an object at `path`.
pub fn obj_pin(fd: &OwnedFd, path: &Path) -> io::Result<()> {
    let c = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path with NUL"))?;
    let mut attr = [0u64; 16];
    attr[0] = c.as_ptr() as u64;
    attr[1] = fd.as_raw_fd() as u64;
    bpf(BPF_OBJ_PIN, &mut attr).map(|_| ())
}

/// What `BPF_OBJ_GET_INFO_BY_FD` tells about a map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapShape {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
}

/// Type, key and value sizes and capacity of a map.
pub fn map_shape(map: &OwnedFd) -> io::Result<MapShape> {
    // struct bpf_map_info: type, id, key_size, value_size, max_entries (u32 each), ...
    let mut info = [0u64; 12];
    let mut attr = [0u64; 16];
    attr[0] = map.as_raw_fd() as u64 | ((std::mem::size_of_val(&info) as u64) << 32);
    attr[1] = info.as_mut_ptr() as u64;
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(MapShape {
        map_type: (info[0] & 0xffff_ffff) as u32,
        key_size: (info[1] & 0xffff_ffff) as u32,
        value_size: (info[1] >> 32) as u32,
        max_entries: (info[2] & 0xffff_ffff) as u32,
    })
}
