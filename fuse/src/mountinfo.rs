//! Finding live mounts in `/proc/self/mountinfo` without touching them.
//!
//! Anything that stats a FUSE mount point asks the filesystem process, which
//! may be the one starting up or the one that hangs; reading the kernel's
//! mount table never does.

use std::io;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub mount_point: PathBuf,
    /// `major:minor` of the mount's device: names its `/sys/class/bdi` entry.
    pub device: String,
    pub fs_type: String,
    pub source: String,
}

/// The mount whose mount point is exactly `path` (the last one when mounts
/// are stacked).
pub fn find(path: &Path) -> Option<MountEntry> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    parse(&text)
        .into_iter()
        .rev()
        .find(|m| m.mount_point == path)
}

/// `path` made absolute and free of symlinks without stat-ing `path` itself
/// (only its parent), so a dead mount at `path` cannot hang the caller.
pub fn resolve(path: &Path) -> io::Result<PathBuf> {
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()?.join(path)
    };
    match (abs.parent(), abs.file_name()) {
        (Some(parent), Some(name)) => Ok(parent.canonicalize()?.join(name)),
        _ => Ok(abs),
    }
}

/// Raises the kernel read-ahead of a mount (and so the size of the read
/// requests it sends). Needs root.
pub fn set_read_ahead_kb(entry: &MountEntry, kb: u32) -> io::Result<()> {
    let file = format!("/sys/class/bdi/{}/read_ahead_kb", entry.device);
    std::fs::write(file, kb.to_string())
}

fn parse(text: &str) -> Vec<MountEntry> {
    let mut out = Vec::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(dash) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        if fields.len() < 5 || fields.len() < dash + 3 {
            continue;
        }
        out.push(MountEntry {
            mount_point: PathBuf::from(unescape(fields[4])),
            device: fields[2].to_string(),
            fs_type: fields[dash + 1].to_string(),
            source: unescape(fields[dash + 2]),
        });
    }
    out
}

/// Undoes the kernel's octal escapes of space, tab, newline and backslash.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
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
    fn parses_mountinfo_lines_with_escapes() {
        let text = "36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw\n\
                    90 36 0:52 / /tmp/a\\040b rw,nosuid,nodev,relatime - fuse.quern quern rw,user_id=0\n";
        let m = parse(text);
        assert_eq!(m.len(), 2);
        assert_eq!(m[1].mount_point, PathBuf::from("/tmp/a b"));
        assert_eq!(m[1].device, "0:52");
        assert_eq!(m[1].fs_type, "fuse.quern");
        assert_eq!(m[1].source, "quern");
        assert_eq!(m[0].fs_type, "ext3");
    }
}
