//! A `newc` cpio archive, the format the kernel unpacks as an initramfs. Written here because
//! the harness needs only directories, files and symlinks, and `cpio` is not on every machine.

/// An archive being built in memory; [`Cpio::finish`] appends the trailer.
#[derive(Default)]
pub struct Cpio {
    out: Vec<u8>,
    next_ino: u32,
}

const DIR: u32 = 0o040_000;
const FILE: u32 = 0o100_000;
const SYMLINK: u32 = 0o120_000;

impl Cpio {
    pub fn dir(&mut self, path: &str) {
        self.entry(path, DIR | 0o755, &[]);
    }

    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) {
        self.entry(path, FILE | (mode & 0o7777), data);
    }

    pub fn symlink(&mut self, path: &str, target: &str) {
        self.entry(path, SYMLINK | 0o777, target.as_bytes());
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[]);
        self.out
    }

    fn entry(&mut self, path: &str, mode: u32, data: &[u8]) {
        let name = path.trim_start_matches('/');
        self.next_ino += 1;
        let nlink = if mode & DIR == DIR { 2 } else { 1 };
        // magic, then 13 fields of 8 hex digits: ino, mode, uid, gid, nlink, mtime, filesize,
        // dev major/minor, rdev major/minor, name size (with its NUL), check.
        let fields = [
            self.next_ino,
            mode,
            0,
            0,
            nlink,
            0,
            data.len() as u32,
            0,
            0,
            0,
            0,
            name.len() as u32 + 1,
            0,
        ];
        self.out.extend_from_slice(b"070701");
        for f in fields {
            self.out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    /// Header plus name, and data, each end on a 4-byte boundary.
    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads the archive back: (name, mode, data) per entry.
    fn parse(mut b: &[u8]) -> Vec<(String, u32, Vec<u8>)> {
        let mut out = Vec::new();
        let mut offset = 0;
        loop {
            assert_eq!(&b[..6], b"070701", "magic at offset {offset}");
            let field = |i: usize| {
                u32::from_str_radix(std::str::from_utf8(&b[6 + i * 8..14 + i * 8]).unwrap(), 16)
                    .unwrap()
            };
            let (mode, size, namesize) = (field(1), field(6) as usize, field(11) as usize);
            let name = std::str::from_utf8(&b[110..110 + namesize - 1])
                .unwrap()
                .to_string();
            assert_eq!(b[110 + namesize - 1], 0, "name of {name} ends with NUL");
            let data_at = (110 + namesize).next_multiple_of(4);
            let data = b[data_at..data_at + size].to_vec();
            let next = (data_at + size).next_multiple_of(4);
            offset += next;
            b = &b[next..];
            if name == "TRAILER!!!" {
                assert!(b.is_empty(), "nothing after the trailer");
                return out;
            }
            out.push((name, mode, data));
        }
    }

    #[test]
    fn entries_read_back_with_their_type_mode_and_data() {
        let mut c = Cpio::default();
        c.dir("/bin");
        c.file("/init", 0o755, b"#!/bin/sh\n");
        c.file("bin/odd", 0o644, b"12345");
        c.symlink("/bin/sh", "busybox");
        let entries = parse(&c.finish());
        assert_eq!(
            entries,
            vec![
                ("bin".into(), 0o040_755, vec![]),
                ("init".into(), 0o100_755, b"#!/bin/sh\n".to_vec()),
                ("bin/odd".into(), 0o100_644, b"12345".to_vec()),
                ("bin/sh".into(), 0o120_777, b"busybox".to_vec()),
            ]
        );
    }
}
