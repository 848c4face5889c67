//! `/proc/self/mountinfo`, parsed (proc(5)): which file system is mounted
//! where, from which device.

use std::path::PathBuf;

/// One line of mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// `major:minor` of the mounted device (`st_dev` of files on it).
    pub dev: (u32, u32),
    /// Where it is mounted (escapes decoded).
    pub mount_point: PathBuf,
    /// File system type (`ext4`, `cgroup2`, `nfs4`).
    pub fstype: String,
    /// Mount source (`/dev/loop0`, `server:/export`), escapes decoded.
    pub source: String,
}

/// Parses mountinfo text; malformed lines are skipped.
pub fn parse(text: &str) -> Vec<MountEntry> {
    text.lines().filter_map(parse_line).collect()
}

/// The mounts of this process now; empty if mountinfo cannot be read.
pub fn read() -> std::io::Result<Vec<MountEntry>> {
    Ok(parse(&std::fs::read_to_string("/proc/self/mountinfo")?))
}

fn parse_line(line: &str) -> Option<MountEntry> {
    // id parent major:minor root mount_point options [optional...] - fstype source super_options
    let (left, right) = line.split_once(" - ")?;
    let mut l = left.split(' ');
    let _id = l.next()?;
    let _parent = l.next()?;
    let (maj, min) = l.next()?.split_once(':')?;
    let _root = l.next()?;
    let mount_point = PathBuf::from(unescape(l.next()?));
    let mut r = right.split(' ');
    let fstype = r.next()?.to_string();
    let source = unescape(r.next()?);
    Some(MountEntry { dev: (maj.parse().ok()?, min.parse().ok()?), mount_point, fstype, source })
}

/// Decodes the kernel's octal escapes (`\040` for a space, `\011`, `\012`, `\134`).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            let v = (b[i + 1] - b'0') as u32 * 64 + (b[i + 2] - b'0') as u32 * 8 + (b[i + 3] - b'0') as u32;
            out.push(v as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_lines_with_optional_fields_and_escapes() {
        let text = "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n\
                    68 27 7:0 / /mnt/a\\040b rw,relatime shared:5 master:1 - ext4 /dev/loop0 rw\n\
                    garbage\n";
        let m = parse(text);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].fstype, "cgroup2");
        assert_eq!(m[0].mount_point, PathBuf::from("/sys/fs/cgroup/unified"));
        assert_eq!(m[1].dev, (7, 0));
        assert_eq!(m[1].mount_point, PathBuf::from("/mnt/a b"));
        assert_eq!(m[1].source, "/dev/loop0");
    }
}
