//! A ring's pieces through shared memory, between workers on one host.
//!
//! Datanodes on one machine summing a gradient around a ring would
//! otherwise encrypt every partial sum, cut it into datagrams and decrypt
//! it again, on the cores the training needs: on a 2-core host that took
//! longer than the step's compute. On Linux a sender writes its pieces into
//! a sealed memfd instead and sends only their offsets on the ring's
//! stream; a receiver on the same host maps that memfd through
//! `/proc/PID/fd/N` and reads them there, as NCCL and MPI move data between
//! the processes of one machine. Everything else (who may send, the order
//! of the turns, deadlines, failures) still goes through the stream.
//!
//! A receiver can open the path only if it shares the sender's host, its
//! process namespace and its user. It then checks that the file is a
//! quern ring region (a memfd of that name, with the magic and the nonce
//! the sender offered at its start, exactly the offered size), so a peer
//! cannot have it read some other open file into the sums; and that it is
//! sealed against shrinking, so its mapping cannot be cut short under the
//! reader (which would kill it with SIGBUS). When anything fails the
//! receiver says so and the pieces come through the stream as before.

use memmap2::{Mmap, MmapMut};
use quern_proto::msg::SharedRing;
use std::fs::File;

/// Bytes before the pieces: the magic, then the nonce.
const HEADER: usize = 64;
const MAGIC: &[u8; 16] = b"quern ring v1\0\0\0";
/// What the kernel calls the memfd, as `/proc/PID/fd/N` shows it.
const NAME: &str = "quern-ring";

/// Largest region offered: it is the host's memory, held for the job.
pub(crate) const MOST_BYTES: u64 = 1 << 30;

/// The region a sender writes its pieces into, for the job's life.
pub(crate) struct Outbound {
    _file: File,
    map: MmapMut,
    offer: SharedRing,
}

impl Outbound {
    /// A region for `len` bytes of pieces.
    pub(crate) fn create(len: u64) -> std::io::Result<Outbound> {
        if len > MOST_BYTES {
            return Err(std::io::Error::other(format!(
                "{len} bytes of ring pieces a step are more than the {MOST_BYTES} shared"
            )));
        }
        let file = memfd()?;
        file.set_len(HEADER as u64 + len)?;
        seal(&file)?;
        // SAFETY: the memfd is this process's alone until offered, and sealed
        // against shrinking, so the mapping stays backed for its life.
        let mut map = unsafe { MmapMut::map_mut(&file)? };
        let nonce: [u8; 16] = rand::random();
        map[..16].copy_from_slice(MAGIC);
        map[16..32].copy_from_slice(&nonce);
        let path = fd_path(&file);
        Ok(Outbound {
            _file: file,
            map,
            offer: SharedRing { path, nonce, len },
        })
    }

    pub(crate) fn offer(&self) -> &SharedRing {
        &self.offer
    }

    /// Writes `values` as little-endian f32 at offset `at` of the pieces.
    pub(crate) fn write(&mut self, at: u64, values: &[f32]) -> Result<(), String> {
        let piece = span(at, values.len(), self.offer.len)?;
        let dst = &mut self.map[HEADER + piece.start..HEADER + piece.end];
        for (d, v) in dst.chunks_exact_mut(4).zip(values) {
            d.copy_from_slice(&v.to_le_bytes());
        }
        Ok(())
    }
}

/// A sender's region as its receiver maps it, read-only.
pub(crate) struct Inbound {
    map: Mmap,
    offer: SharedRing,
}

impl Inbound {
    /// Maps the region `offer` names, after checking it is what it says.
    pub(crate) fn attach(offer: &SharedRing) -> Result<Inbound, String> {
        let path = &offer.path;
        if !is_fd_path(path) {
            return Err(format!("{path} is not a /proc/PID/fd/N path"));
        }
        let link = std::fs::read_link(path).map_err(|e| format!("{path}: {e}"))?;
        if link.to_string_lossy() != format!("/memfd:{NAME} (deleted)") {
            return Err(format!("{path} is {}, not a ring region", link.display()));
        }
        let file = File::open(path).map_err(|e| format!("{path}: {e}"))?;
        if !sealed_against_shrinking(&file) {
            return Err(format!("{path} is not sealed against shrinking"));
        }
        let size = file.metadata().map_err(|e| format!("{path}: {e}"))?.len();
        if offer.len > MOST_BYTES || size != HEADER as u64 + offer.len {
            return Err(format!(
                "{path} holds {size} bytes, not the {} offered",
                HEADER as u64 + offer.len
            ));
        }
        // SAFETY: sealed against shrinking (checked above), so every page of
        // the mapping stays backed while it is held.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| format!("{path}: {e}"))?;
        if &map[..16] != MAGIC || map[16..32] != offer.nonce {
            return Err(format!("{path} is not the offered ring region"));
        }
        Ok(Inbound {
            map,
            offer: offer.clone(),
        })
    }

    /// The bytes of `values` f32 values at offset `at` of the pieces.
    pub(crate) fn piece(&self, at: u64, values: usize) -> Result<&[u8], String> {
        let piece = span(at, values, self.offer.len)?;
        Ok(&self.map[HEADER + piece.start..HEADER + piece.end])
    }
}

/// The byte range of `values` f32 values at `at`, if inside `len`.
fn span(at: u64, values: usize, len: u64) -> Result<std::ops::Range<usize>, String> {
    let bytes = values as u64 * 4;
    match at.checked_add(bytes) {
        Some(end) if end <= len && at.is_multiple_of(4) => Ok(at as usize..end as usize),
        _ => Err(format!(
            "a piece of {bytes} bytes at offset {at} is outside the {len}-byte ring region"
        )),
    }
}

fn is_fd_path(path: &str) -> bool {
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let mut parts = path.split('/');
    parts.next() == Some("")
        && parts.next() == Some("proc")
        && parts.next().is_some_and(digits)
        && parts.next() == Some("fd")
        && parts.next().is_some_and(digits)
        && parts.next().is_none()
}

#[cfg(target_os = "linux")]
fn memfd() -> std::io::Result<File> {
    use std::os::fd::FromRawFd;
    let name = std::ffi::CString::new(NAME).map_err(std::io::Error::other)?;
    // SAFETY: a valid C string; the returned descriptor is owned by the File.
    let fd =
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd was just created and nothing else owns it.
    Ok(unsafe { File::from_raw_fd(fd) })
}

#[cfg(not(target_os = "linux"))]
fn memfd() -> std::io::Result<File> {
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "shared ring memory needs Linux's memfd",
    ))
}

#[cfg(target_os = "linux")]
fn seal(file: &File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: fcntl on a descriptor this File owns.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(not(target_os = "linux"))]
fn seal(_: &File) -> std::io::Result<()> {
    Ok(())
}

#[cfg(target_os = "linux")]
fn sealed_against_shrinking(file: &File) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: fcntl on a descriptor this File owns.
    let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
    seals >= 0 && seals & libc::F_SEAL_SHRINK != 0
}

#[cfg(not(target_os = "linux"))]
fn sealed_against_shrinking(_: &File) -> bool {
    false
}

fn fd_path(file: &File) -> String {
    #[cfg(unix)]
    {
        use std::os::fd::AsRawFd;
        format!("/proc/{}/fd/{}", std::process::id(), file.as_raw_fd())
    }
    #[cfg(not(unix))]
    {
        let _ = file;
        String::new()
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use quern_compute::ring::take_arrived;

    #[test]
    fn a_receiver_reads_what_the_sender_wrote() {
        let mut out = Outbound::create(64).unwrap();
        out.write(8, &[1.5, -2.0, 3.25]).unwrap();
        let inb = Inbound::attach(out.offer()).unwrap();
        let mut mine = [10.0f32, 20.0, 30.0];
        take_arrived(&mut mine, inb.piece(8, 3).unwrap(), true);
        assert_eq!(mine, [11.5, 18.0, 33.25]);
        take_arrived(&mut mine, inb.piece(8, 3).unwrap(), false);
        assert_eq!(mine, [1.5, -2.0, 3.25]);
    }

    #[test]
    fn pieces_outside_the_region_are_refused() {
        let mut out = Outbound::create(16).unwrap();
        assert!(out.write(8, &[0.0; 3]).is_err());
        assert!(out.write(u64::MAX - 3, &[0.0]).is_err());
        let inb = Inbound::attach(out.offer()).unwrap();
        let e = inb.piece(4, 4).unwrap_err();
        assert!(e.contains("outside the 16-byte ring region"), "{e}");
        assert!(inb.piece(2, 1).is_err(), "unaligned");
    }

    #[test]
    fn only_the_offered_region_is_mapped() {
        let out = Outbound::create(32).unwrap();
        let offer = out.offer().clone();
        let wrong_nonce = SharedRing {
            nonce: [7; 16],
            ..offer.clone()
        };
        let e = Inbound::attach(&wrong_nonce).err().unwrap();
        assert!(e.contains("not the offered ring region"), "{e}");
        let wrong_len = SharedRing {
            len: 64,
            ..offer.clone()
        };
        assert!(Inbound::attach(&wrong_len)
            .err()
            .unwrap()
            .contains("holds 96 bytes"));
        // Another open file of this process, and any path but /proc/PID/fd/N.
        let other = tempfile::tempfile().unwrap();
        let other = SharedRing {
            path: fd_path(&other),
            ..offer.clone()
        };
        let e = Inbound::attach(&other).err().unwrap();
        assert!(e.contains("not a ring region"), "{e}");
        for path in ["/etc/passwd", "/proc/self/fd/0", "/proc/1/fd/../../etc", ""] {
            let bad = SharedRing {
                path: path.into(),
                ..offer.clone()
            };
            let e = Inbound::attach(&bad).err().unwrap();
            assert!(e.contains("is not a /proc/PID/fd/N path"), "{path}: {e}");
        }
    }

    #[test]
    fn an_unsealed_memfd_is_refused() {
        let file = memfd().unwrap();
        file.set_len(HEADER as u64 + 16).unwrap();
        let offer = SharedRing {
            path: fd_path(&file),
            nonce: [0; 16],
            len: 16,
        };
        let e = Inbound::attach(&offer).err().unwrap();
        assert!(e.contains("not sealed against shrinking"), "{e}");
    }
}
