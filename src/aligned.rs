//! Block-aligned memory for direct I/O (`O_DIRECT`), which takes buffers,
//! offsets and lengths that are multiples of the device's logical block.

/// Offsets, lengths and buffer addresses of direct I/O are multiples of
/// this: the largest logical block size of Linux block devices.
pub const BLOCK: usize = 4096;

/// `O_DIRECT` where the platform has it; elsewhere 0, an ordinary open.
#[cfg(target_os = "linux")]
pub const O_DIRECT: libc::c_int = libc::O_DIRECT;
#[cfg(not(target_os = "linux"))]
pub const O_DIRECT: libc::c_int = 0;

/// Opens `path` as `options` say, with `O_DIRECT`; `None` where the file
/// system does not take direct I/O (it refuses with `EINVAL`).
pub fn open_direct(
    options: &mut std::fs::OpenOptions,
    path: &std::path::Path,
) -> std::io::Result<Option<std::fs::File>> {
    use std::os::unix::fs::OpenOptionsExt;
    match options.custom_flags(O_DIRECT).open(path) {
        Ok(file) => Ok(Some(file)),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(None),
        Err(e) => Err(e),
    }
}

/// A zeroed buffer of a fixed length whose first byte is [`BLOCK`]-aligned.
pub struct AlignedBuf {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    /// A buffer of `len` bytes (rounded up to whole blocks).
    pub fn new(len: usize) -> Self {
        let len = len.next_multiple_of(BLOCK);
        let raw = vec![0u8; len + BLOCK];
        let start = raw.as_ptr().align_offset(BLOCK);
        AlignedBuf { raw, start, len }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.raw[self.start..self.start + self.len]
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + self.len]
    }
}

impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_block_aligned_and_whole_blocks_long() {
        for len in [1, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK] {
            let mut buf = AlignedBuf::new(len);
            assert_eq!(buf.as_slice().as_ptr() as usize % BLOCK, 0);
            assert_eq!(buf.len(), len.next_multiple_of(BLOCK));
            assert!(buf.as_slice().iter().all(|b| *b == 0));
            buf.as_mut_slice().fill(7);
            assert_eq!(buf.as_slice().len(), buf.len());
        }
    }
}
