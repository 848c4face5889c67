//! The medium a lease area lives on: the [`LeaseDisk`] trait, [`FileDisk`]
//! (a block device or a file on shared storage, O_DIRECT where possible) and
//! [`MemDisk`] (in memory, for tests).
//!
//! A `LeaseDisk` only moves bytes; it enforces no timeout. The lease driver
//! measures each I/O and discards results that arrive later than the I/O
//! timeout (see `engine`).

use std::alloc::{Layout as AllocLayout, alloc_zeroed, dealloc};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use thiserror::Error;

/// Errors of lease-disk I/O.
#[derive(Debug, Error)]
pub enum DiskError {
    /// Opening the device or file failed.
    #[error("cannot open lease disk {path}")]
    Open {
        /// The path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// An offset or length is not a multiple of the disk's alignment.
    #[error(
        "lease disk I/O at offset {offset}, length {len} is not aligned to {alignment} bytes; \
         use a sector size that is a multiple of the device's logical block size"
    )]
    Misaligned {
        /// Requested offset.
        offset: u64,
        /// Requested length.
        len: usize,
        /// Required alignment.
        alignment: usize,
    },
    /// A read went past the end of the disk.
    #[error(
        "lease disk read at offset {offset}, length {len} goes past its end ({size} bytes); \
         the lease area is truncated or the wrong device was given"
    )]
    PastEnd {
        /// Requested offset.
        offset: u64,
        /// Requested length.
        len: usize,
        /// Size of the disk.
        size: u64,
    },
    /// The OS reported an error for a read or write.
    #[error("lease disk {op} at offset {offset}, length {len} failed")]
    Io {
        /// "read" or "write".
        op: &'static str,
        /// Offset.
        offset: u64,
        /// Length.
        len: usize,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// An error injected by a test disk.
    #[error("injected lease disk fault: {0}")]
    Injected(String),
}

/// How a [`FileDisk`] reaches the medium.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoMode {
    /// O_DIRECT (and O_DSYNC): no page cache, so other hosts see our writes.
    Direct,
    /// O_DSYNC only, because the filesystem refused O_DIRECT (e.g. tmpfs).
    /// Fine for a single machine; on shared storage another host may read
    /// stale cached data, so do not use it across hosts.
    Dsync,
    /// In memory (tests).
    Memory,
}

/// Sector-aligned random-access storage holding a lease area.
///
/// Offsets and lengths passed in must be multiples of [`LeaseDisk::alignment`];
/// buffers may be ordinary slices (implementations copy through aligned
/// buffers as needed). Calls block; callers enforce timeouts.
pub trait LeaseDisk: Send + Sync + std::fmt::Debug {
    /// Required alignment of offsets and lengths (the logical block size).
    fn alignment(&self) -> usize;
    /// Size of the medium in bytes.
    fn size(&self) -> Result<u64, DiskError>;
    /// Reads exactly `buf.len()` bytes at `offset`.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError>;
    /// Writes all of `data` at `offset`; durable when this returns.
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), DiskError>;
    /// How the medium is reached.
    fn io_mode(&self) -> IoMode;
}

fn check_aligned(offset: u64, len: usize, alignment: usize) -> Result<(), DiskError> {
    if offset % alignment as u64 != 0 || len % alignment != 0 {
        return Err(DiskError::Misaligned { offset, len, alignment });
    }
    Ok(())
}

/// A heap buffer aligned for O_DIRECT.
struct AlignedBuf {
    ptr: *mut u8,
    layout: AllocLayout,
}

impl AlignedBuf {
    const ALIGN: usize = 4096;

    fn new(len: usize) -> AlignedBuf {
        let layout = AllocLayout::from_size_align(len.max(1), Self::ALIGN).expect("valid layout");
        // SAFETY: the layout has non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        AlignedBuf { ptr, layout }
    }

    fn as_mut_slice(&mut self, len: usize) -> &mut [u8] {
        assert!(len <= self.layout.size());
        // SAFETY: ptr points to layout.size() initialised (zeroed) bytes owned by self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: ptr was allocated with this layout in `new`.
        unsafe { dealloc(self.ptr, self.layout) }
    }
}

/// A lease area on a block device or a regular file.
#[derive(Debug)]
pub struct FileDisk {
    file: File,
    path: PathBuf,
    alignment: usize,
    mode: IoMode,
    block_device: bool,
}

impl FileDisk {
    /// Opens `path` read-write with O_DIRECT|O_DSYNC; if the filesystem
    /// refuses O_DIRECT, falls back to O_DSYNC and logs a warning (see
    /// [`IoMode::Dsync`]). The alignment is the device's logical block size
    /// for block devices, and the smallest of 512/4096 that O_DIRECT accepts
    /// for files.
    pub fn open(path: impl AsRef<Path>) -> Result<FileDisk, DiskError> {
        Self::open_with(path.as_ref(), |path, flags| {
            OpenOptions::new().read(true).write(true).custom_flags(flags).open(path)
        })
    }

    /// `open` with the `open(2)` call supplied, so that the fallback can be
    /// tested on kernels whose every filesystem accepts O_DIRECT.
    fn open_with(path: &Path, open: impl Fn(&Path, i32) -> std::io::Result<File>) -> Result<FileDisk, DiskError> {
        let path = path.to_path_buf();
        let err = |source| DiskError::Open { path: path.clone(), source };
        let (file, mode) = match open(&path, libc::O_DIRECT | libc::O_DSYNC) {
            Ok(f) => (f, IoMode::Direct),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                tracing::warn!(
                    path = %path.display(),
                    "filesystem does not support O_DIRECT; using O_DSYNC. Other hosts may read stale \
                     cached data: do not share this lease area between machines"
                );
                (open(&path, libc::O_DSYNC).map_err(err)?, IoMode::Dsync)
            }
            Err(e) => return Err(err(e)),
        };
        let meta = file.metadata().map_err(err)?;
        let block_device = meta.file_type().is_block_device();
        let alignment = if block_device {
            logical_block_size(&file).map_err(err)?
        } else if mode == IoMode::Direct {
            probe_direct_alignment(&file)
        } else {
            512
        };
        Ok(FileDisk { file, path, alignment, mode, block_device })
    }

    /// The path opened.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the path is a block device.
    pub fn is_block_device(&self) -> bool {
        self.block_device
    }
}

fn logical_block_size(file: &File) -> std::io::Result<usize> {
    use std::os::fd::AsRawFd;
    // BLKSSZGET = _IO(0x12, 104)
    const BLKSSZGET: libc::c_ulong = 0x1268;
    let mut size: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one c_int through the pointer, which points to a live local.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKSSZGET as _, &mut size as *mut libc::c_int) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(size.max(512) as usize)
}

/// The smallest alignment (512 or 4096) at which an O_DIRECT read succeeds.
fn probe_direct_alignment(file: &File) -> usize {
    let mut buf = AlignedBuf::new(4096);
    match file.read_at(buf.as_mut_slice(512), 512) {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => 4096,
        _ => 512,
    }
}

impl LeaseDisk for FileDisk {
    fn alignment(&self) -> usize {
        self.alignment
    }

    fn size(&self) -> Result<u64, DiskError> {
        if self.block_device {
            use std::io::{Seek, SeekFrom};
            let mut f = &self.file;
            return f.seek(SeekFrom::End(0)).map_err(|source| DiskError::Io { op: "seek", offset: 0, len: 0, source });
        }
        self.file.metadata().map(|m| m.len()).map_err(|source| DiskError::Io { op: "stat", offset: 0, len: 0, source })
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        check_aligned(offset, buf.len(), self.alignment)?;
        let size = self.size()?;
        if offset + buf.len() as u64 > size {
            return Err(DiskError::PastEnd { offset, len: buf.len(), size });
        }
        let mut aligned = AlignedBuf::new(buf.len());
        let io = aligned.as_mut_slice(buf.len());
        self.file.read_exact_at(io, offset).map_err(|source| DiskError::Io {
            op: "read",
            offset,
            len: buf.len(),
            source,
        })?;
        buf.copy_from_slice(io);
        Ok(())
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), DiskError> {
        check_aligned(offset, data.len(), self.alignment)?;
        let mut aligned = AlignedBuf::new(data.len());
        let io = aligned.as_mut_slice(data.len());
        io.copy_from_slice(data);
        self.file.write_all_at(io, offset).map_err(|source| DiskError::Io {
            op: "write",
            offset,
            len: data.len(),
            source,
        })
    }

    fn io_mode(&self) -> IoMode {
        self.mode
    }
}

/// An in-memory lease disk, for tests and examples.
#[derive(Debug)]
pub struct MemDisk {
    bytes: Mutex<Vec<u8>>,
    alignment: usize,
}

impl MemDisk {
    /// A zero-filled disk of `size` bytes with the given alignment.
    pub fn new(size: u64, alignment: usize) -> MemDisk {
        MemDisk { bytes: Mutex::new(vec![0; size as usize]), alignment }
    }

    /// A copy of the whole content.
    pub fn snapshot(&self) -> Vec<u8> {
        self.bytes.lock().expect("memdisk lock").clone()
    }

    /// Overwrites bytes directly (to simulate corruption), ignoring
    /// alignment; grows the disk if needed.
    pub fn poke(&self, offset: u64, data: &[u8]) {
        let mut b = self.bytes.lock().expect("memdisk lock");
        if b.len() < offset as usize + data.len() {
            b.resize(offset as usize + data.len(), 0);
        }
        b[offset as usize..offset as usize + data.len()].copy_from_slice(data);
    }
}

impl LeaseDisk for MemDisk {
    fn alignment(&self) -> usize {
        self.alignment
    }

    fn size(&self) -> Result<u64, DiskError> {
        Ok(self.bytes.lock().expect("memdisk lock").len() as u64)
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        check_aligned(offset, buf.len(), self.alignment)?;
        let b = self.bytes.lock().expect("memdisk lock");
        let size = b.len() as u64;
        if offset + buf.len() as u64 > size {
            return Err(DiskError::PastEnd { offset, len: buf.len(), size });
        }
        buf.copy_from_slice(&b[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), DiskError> {
        check_aligned(offset, data.len(), self.alignment)?;
        let mut b = self.bytes.lock().expect("memdisk lock");
        let end = offset as usize + data.len();
        if end > b.len() {
            b.resize(end, 0);
        }
        b[offset as usize..end].copy_from_slice(data);
        Ok(())
    }

    fn io_mode(&self) -> IoMode {
        IoMode::Memory
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn falls_back_to_o_dsync_when_o_direct_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("area");
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        let disk = FileDisk::open_with(&path, |p, flags| {
            if flags & libc::O_DIRECT != 0 {
                // What a filesystem without O_DIRECT support answers.
                return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
            }
            assert!(flags & libc::O_DSYNC != 0, "the fallback must still be synchronous");
            OpenOptions::new().read(true).write(true).custom_flags(flags).open(p)
        })
        .unwrap();
        assert_eq!(disk.io_mode(), IoMode::Dsync);
        disk.write_at(512, &[7u8; 512]).unwrap();
        let mut back = [0u8; 512];
        disk.read_at(512, &mut back).unwrap();
        assert_eq!(back, [7u8; 512]);
    }

    #[test]
    fn other_open_errors_are_not_hidden_by_the_fallback() {
        let err = FileDisk::open("/nonexistent/lease-area").unwrap_err();
        assert!(
            matches!(&err, DiskError::Open { source, .. } if source.kind() == std::io::ErrorKind::NotFound),
            "{err}"
        );
        assert!(err.to_string().contains("/nonexistent/lease-area"));
    }
}
