//! Restored files written past the page cache (`O_DIRECT`).
//!
//! Writing gigabytes through the page cache copies every byte into newly
//! allocated cache pages, the largest kernel cost of a restore to a local
//! disk, and evicts the applications' cached data for files nothing reads
//! soon. Direct writes take whole aligned blocks, while chunks start and
//! end anywhere: a [`BlockAssembler`] gathers a file's bytes, given in
//! increasing offsets, into an aligned buffer and hands out whole blocks,
//! keeping the partial block at its end for the bytes that follow (which
//! may come with the next batch).

use std::io;

use crate::aligned::{AlignedBuf, BLOCK};

/// Files at least this large are written directly: a direct write waits
/// for the device, which many small files would pay once each, while the
/// page cache lets their writes return at once.
pub(super) const DIRECT_MIN: u64 = 4 << 20;

/// The assembly buffer of a file being written: the most one write carries.
pub(super) const ASSEMBLY_BYTES: usize = 4 << 20;

/// Gathers the bytes of one file into whole blocks at block-aligned
/// offsets. Blocks of zeros are not written: a file restored into is new
/// and empty, so they stay holes, as they were in a sparse file.
pub(super) struct BlockAssembler {
    buf: AlignedBuf,
    /// The file offset of the buffer's first byte, a multiple of [`BLOCK`].
    start: u64,
    /// How many bytes of the buffer hold the file from `start`.
    len: usize,
}

impl BlockAssembler {
    pub fn new(buf: AlignedBuf) -> Self {
        BlockAssembler {
            buf,
            start: 0,
            len: 0,
        }
    }

    /// The buffer, for the next file.
    pub fn into_buffer(self) -> AlignedBuf {
        self.buf
    }

    fn end(&self) -> u64 {
        self.start + self.len as u64
    }

    /// Adds `data` at `offset`, at or past the end of what was added
    /// before (the bytes between are zeros). Full buffers are written with
    /// `write(offset, blocks)`.
    pub fn put(
        &mut self,
        offset: u64,
        mut data: &[u8],
        write: &mut impl FnMut(u64, &[u8]) -> io::Result<()>,
    ) -> io::Result<()> {
        let end = self.end();
        if offset < end {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("bytes at {offset} come after bytes up to {end}"),
            ));
        }
        let capacity = self.buf.len();
        if offset - self.start <= capacity as u64 {
            // Zeros up to `offset`, in the buffer.
            let to = (offset - self.start) as usize;
            self.buf.as_mut_slice()[self.len..to].fill(0);
            self.len = to;
        } else {
            // The zeros reach past the buffer: what it holds is written
            // (its last block padded with the zeros that follow it) and a
            // new run starts at the block `offset` falls in, whose bytes
            // before `offset` are zeros too.
            self.finish(write)?;
            self.start = offset / BLOCK as u64 * BLOCK as u64;
            self.len = (offset - self.start) as usize;
            self.buf.as_mut_slice()[..self.len].fill(0);
        }
        while !data.is_empty() {
            if self.len == capacity {
                self.write_blocks(capacity, write)?;
                self.start += capacity as u64;
                self.len = 0;
            }
            let n = (capacity - self.len).min(data.len());
            self.buf.as_mut_slice()[self.len..self.len + n].copy_from_slice(&data[..n]);
            self.len += n;
            data = &data[n..];
        }
        Ok(())
    }

    /// Writes every whole block gathered and keeps the partial one at the
    /// end, for the bytes that follow.
    pub fn write_whole_blocks(
        &mut self,
        write: &mut impl FnMut(u64, &[u8]) -> io::Result<()>,
    ) -> io::Result<()> {
        let whole = self.len / BLOCK * BLOCK;
        if whole == 0 {
            return Ok(());
        }
        self.write_blocks(whole, write)?;
        self.buf.as_mut_slice().copy_within(whole..self.len, 0);
        self.start += whole as u64;
        self.len -= whole;
        Ok(())
    }

    /// Writes everything gathered, the last block padded with zeros: the
    /// file's length is set afterwards by its writer.
    pub fn finish(
        &mut self,
        write: &mut impl FnMut(u64, &[u8]) -> io::Result<()>,
    ) -> io::Result<()> {
        let padded = self.len.next_multiple_of(BLOCK);
        self.buf.as_mut_slice()[self.len..padded].fill(0);
        self.write_blocks(padded, write)?;
        self.start += padded as u64;
        self.len = 0;
        Ok(())
    }

    /// Writes the first `upto` bytes (whole blocks) of the buffer, each run
    /// of blocks that are not all zeros with one write.
    fn write_blocks(
        &self,
        upto: usize,
        write: &mut impl FnMut(u64, &[u8]) -> io::Result<()>,
    ) -> io::Result<()> {
        let blocks = &self.buf.as_slice()[..upto];
        let mut run: Option<usize> = None;
        for (i, block) in blocks.chunks(BLOCK).enumerate() {
            let zero = block[0] == 0 && block.iter().all(|b| *b == 0);
            match (run, zero) {
                (None, false) => run = Some(i * BLOCK),
                (Some(from), true) => {
                    write(self.start + from as u64, &blocks[from..i * BLOCK])?;
                    run = None;
                }
                _ => {}
            }
        }
        if let Some(from) = run {
            write(self.start + from as u64, &blocks[from..])?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_data::pseudo_random;

    /// A file image written through an assembler, checking that every write
    /// is block-aligned in offset, length and address and that no block is
    /// written twice.
    #[derive(Default)]
    struct Image {
        bytes: Vec<u8>,
        written: std::collections::HashSet<u64>,
        writes: usize,
    }

    impl Image {
        fn write(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
            assert_eq!(offset % BLOCK as u64, 0, "offset {offset}");
            assert_eq!(data.len() % BLOCK, 0, "length {}", data.len());
            assert_eq!(data.as_ptr() as usize % BLOCK, 0, "address");
            assert!(!data.is_empty());
            for block in 0..(data.len() / BLOCK) as u64 {
                assert!(
                    self.written.insert(offset / BLOCK as u64 + block),
                    "block at {offset} written twice"
                );
            }
            let end = offset as usize + data.len();
            if self.bytes.len() < end {
                self.bytes.resize(end, 0);
            }
            self.bytes[offset as usize..end].copy_from_slice(data);
            self.writes += 1;
            Ok(())
        }
    }

    /// Puts `pieces` (offset, bytes) through an assembler of `capacity`
    /// bytes, keeping only the partial block between groups of
    /// `per_batch` pieces, as batches of a restore do, and returns the
    /// image cut to `size`, as the restore's writer cuts the file.
    fn assemble(pieces: &[(u64, Vec<u8>)], capacity: usize, per_batch: usize, size: u64) -> Image {
        let mut image = Image::default();
        let mut assembler = BlockAssembler::new(AlignedBuf::new(capacity));
        for batch in pieces.chunks(per_batch) {
            for (offset, data) in batch {
                assembler
                    .put(*offset, data, &mut |o, d| image.write(o, d))
                    .unwrap();
            }
            assembler
                .write_whole_blocks(&mut |o, d| image.write(o, d))
                .unwrap();
            assert!(assembler.len < BLOCK, "only a partial block is kept");
        }
        assembler.finish(&mut |o, d| image.write(o, d)).unwrap();
        image.bytes.resize(size as usize, 0);
        image
    }

    /// The file that `pieces` make: zeros where no piece is.
    fn expected(pieces: &[(u64, Vec<u8>)], size: u64) -> Vec<u8> {
        let mut bytes = vec![0u8; size as usize];
        for (offset, data) in pieces {
            bytes[*offset as usize..*offset as usize + data.len()].copy_from_slice(data);
        }
        bytes
    }

    #[test]
    fn pieces_of_any_length_and_gap_come_out_as_the_same_file() {
        let source = pseudo_random(3 << 20, 11);
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = |bound: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % bound
        };
        for round in 0..200 {
            let mut pieces = Vec::new();
            let mut offset = next(3) * next(10_000);
            for _ in 0..1 + next(12) {
                let len = 1 + next(if round % 2 == 0 { 9000 } else { 300_000 }) as usize;
                let from = next((source.len() - len) as u64) as usize;
                let mut data = source[from..from + len].to_vec();
                // Some pieces hold whole blocks of zeros, left as holes.
                if next(4) == 0 && len > 3 * BLOCK {
                    data[BLOCK..3 * BLOCK].fill(0);
                }
                pieces.push((offset, data));
                offset += len as u64;
                // Gaps: none, within a block, and past the buffer.
                offset += match next(4) {
                    0 => next(BLOCK as u64),
                    1 => next(200_000),
                    _ => 0,
                };
            }
            let size = offset + next(3) * next(5000);
            let capacity = [BLOCK, 2 * BLOCK, 64 * 1024][next(3) as usize];
            let per_batch = 1 + next(4) as usize;
            let image = assemble(&pieces, capacity, per_batch, size);
            assert!(
                image.bytes == expected(&pieces, size),
                "round {round}: capacity {capacity}, {per_batch} per batch, pieces {:?}",
                pieces
                    .iter()
                    .map(|(o, d)| (*o, d.len()))
                    .collect::<Vec<_>>()
            );
        }
    }

    #[test]
    fn zero_blocks_are_not_written() {
        let mut data = vec![1u8; 10 * BLOCK];
        data[2 * BLOCK..5 * BLOCK].fill(0);
        let pieces = vec![(0, data)];
        let image = assemble(&pieces, 64 * 1024, 1, 10 * BLOCK as u64);
        assert_eq!(image.bytes, expected(&pieces, 10 * BLOCK as u64));
        assert_eq!(image.writes, 2, "the two runs around the zeros");
        assert_eq!(image.written.len(), 7);
    }

    #[test]
    fn a_long_gap_is_left_unwritten() {
        let pieces = vec![(10, vec![5u8; 100]), (1 << 24, vec![6u8; 100])];
        let image = assemble(&pieces, 64 * 1024, 1, (1 << 24) + 100);
        assert_eq!(image.written.len(), 2, "one block at each end");
        assert_eq!(image.bytes, expected(&pieces, (1 << 24) + 100));
    }

    #[test]
    fn bytes_before_the_end_are_refused() {
        let mut assembler = BlockAssembler::new(AlignedBuf::new(BLOCK));
        let mut ignore = |_: u64, _: &[u8]| Ok(());
        assembler.put(100, &[1; 50], &mut ignore).unwrap();
        let error = assembler.put(120, &[1; 5], &mut ignore).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidInput);
    }
}
