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

/// A growable byte buffer whose first byte is [`BLOCK`]-aligned, so that
/// what is built in it can be written with `O_DIRECT` without a copy.
/// Its spare capacity is not zeroed again when it is reused.
pub struct AlignedVec {
    buf: AlignedBuf,
    len: usize,
}

impl AlignedVec {
    /// An empty buffer with room for at least `capacity` bytes.
    pub fn with_capacity(capacity: usize) -> Self {
        AlignedVec {
            buf: AlignedBuf::new(capacity.max(1)),
            len: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.buf.len()
    }

    /// Empties the buffer, keeping its memory.
    pub fn clear(&mut self) {
        self.len = 0;
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.buf.as_slice()[..self.len]
    }

    /// Appends `bytes`; past the capacity, the buffer moves to one twice
    /// as large (or large enough).
    pub fn extend_from_slice(&mut self, bytes: &[u8]) {
        let end = self.len + bytes.len();
        if end > self.capacity() {
            let mut grown = AlignedBuf::new(end.max(2 * self.capacity()));
            grown.as_mut_slice()[..self.len].copy_from_slice(self.as_slice());
            self.buf = grown;
        }
        self.buf.as_mut_slice()[self.len..end].copy_from_slice(bytes);
        self.len = end;
    }
}

impl AsRef<[u8]> for AlignedVec {
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

    #[test]
    fn aligned_vecs_keep_their_bytes_and_alignment_when_they_grow() {
        let mut v = AlignedVec::with_capacity(10);
        assert!(v.is_empty());
        assert_eq!(v.capacity(), BLOCK);
        let mut expected = Vec::new();
        for round in 0..5u8 {
            let piece = vec![round; 3000];
            v.extend_from_slice(&piece);
            expected.extend_from_slice(&piece);
            assert_eq!(v.as_slice(), &expected[..]);
            assert_eq!(v.as_slice().as_ptr() as usize % BLOCK, 0);
            assert!(v.capacity() >= v.len());
        }
        let capacity = v.capacity();
        v.clear();
        assert!(v.is_empty());
        assert_eq!(v.capacity(), capacity, "cleared, not freed");
        v.extend_from_slice(b"again");
        assert_eq!(v.as_slice(), b"again");
    }
}
