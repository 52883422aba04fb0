//! Changed-block tracking for block volumes: when the storage system says
//! which byte ranges of a device changed since the snapshot its parent
//! backup read (the CSI SnapshotMetadata service, for one), only the
//! neighbourhood of those ranges is read; the rest of the device is the
//! parent's chunks, taken over unread.
//!
//! The result is exactly what a full read would give, chunk for chunk.
//! A content-defined cut depends only on the bytes from the chunk's start
//! up to and including the first byte after the cut (see
//! [`super::chunker::Chunker::chunks_until`]). A parent chunk that starts
//! at a cut of the new content, and none of whose bytes nor the byte after
//! it changed, is therefore cut the same again. So the device is re-cut
//! from the start of the first parent chunk a change touches, until a new
//! cut lands on the start of a parent chunk no change touches; from there
//! the parent's chunks are taken over up to the next change.

use std::io::{Read, Seek, SeekFrom};
use std::ops::Range;

use super::chunker::Chunker;
use super::tree::Piece;
use crate::repo::BlobId;

/// A device's parent content and what changed since: what
/// [`read_changed`] needs.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockDelta {
    /// The parent's pieces with their offsets, in order, covering 0..size.
    spans: Vec<(u64, Piece)>,
    /// For a span of zeros, where its run of zero spans ends.
    zeros_until: Vec<u64>,
    size: u64,
    /// Changed byte ranges: sorted, merged, non-empty, within 0..size.
    changed: Vec<Range<u64>>,
    /// Where the chunker cuts a run of zeros, and its largest chunk.
    zero_chunk: u64,
    max_chunk: u64,
}

impl BlockDelta {
    /// The parent's `pieces` of a device of `size` bytes, and the ranges
    /// (offset, length) that changed since. `length` gives a chunk's
    /// plaintext length, `None` when the chunk cannot be taken over (not
    /// in the index, or marked for deletion); `chunker` is the one that
    /// cut the parent. An error says why the parent cannot be the base;
    /// the device is then read whole.
    pub fn new(
        pieces: &[Piece],
        length: impl Fn(&BlobId) -> Option<u64>,
        chunker: &Chunker,
        size: u64,
        changed: &[(u64, u64)],
    ) -> Result<Self, String> {
        let zero_chunk = chunker.zero_chunk_len() as u64;
        let mut spans = Vec::with_capacity(pieces.len());
        let mut offset = 0u64;
        for piece in pieces {
            match piece {
                // A hole is a run of zero chunks, cut every `zero_chunk`
                // bytes from its start: each cut is a place to get back
                // in step after a change in the run (a volume filling up
                // writes into zeros).
                Piece::Zeros(n) => {
                    let mut left = *n;
                    while left > 0 {
                        let len = left.min(zero_chunk.max(1));
                        spans.push((offset, Piece::Zeros(len)));
                        offset += len;
                        left -= len;
                    }
                }
                Piece::Chunk(id) => {
                    let len = length(id).ok_or_else(|| {
                        format!("the parent's chunk {id} is not in the repository's index or is marked for deletion")
                    })?;
                    spans.push((offset, *piece));
                    offset += len;
                }
            }
        }
        if offset != size {
            return Err(format!(
                "the parent holds {offset} bytes of the device, which now has {size}"
            ));
        }
        // Backwards: a span of zeros ends its run where the next span that
        // is not zeros starts (or at the end).
        let mut zeros_until = vec![0; spans.len()];
        let mut run_end = size;
        for (i, (start, piece)) in spans.iter().enumerate().rev() {
            match piece {
                Piece::Zeros(_) => zeros_until[i] = run_end,
                Piece::Chunk(_) => run_end = *start,
            }
        }
        Ok(BlockDelta {
            spans,
            zeros_until,
            size,
            changed: merge_ranges(changed, size),
            zero_chunk: zero_chunk.max(1),
            max_chunk: chunker.max_len() as u64,
        })
    }

    /// Whether a parent chunk starts at `pos` that neither a change nor
    /// the byte after it touches (`next_change` is the first changed byte
    /// from `pos` on): it and those after it like it are taken over.
    fn reusable_at(&self, pos: u64, next_change: u64) -> Option<usize> {
        let j = self.spans.binary_search_by_key(&pos, |s| s.0).ok()?;
        (self.span_end(j) < next_change).then_some(j)
    }

    /// How many bytes from the cut `pos` on are known zeros cut exactly as
    /// a read would cut them: the parent holds zeros there and nothing
    /// changed, so the chunker cuts every `zero_chunk` bytes as long as
    /// each cut only looks at those zeros and has a full window.
    fn zeros_at(&self, pos: u64, next_change: u64) -> u64 {
        let j = self.spans.partition_point(|s| s.0 <= pos).saturating_sub(1);
        let limit = self
            .zeros_until
            .get(j)
            .copied()
            .unwrap_or(0)
            .min(next_change);
        if limit <= pos || self.size < pos + self.max_chunk {
            return 0;
        }
        let z = self.zero_chunk;
        let by_zeros = (limit - pos - 1) / z;
        let by_window = (self.size - pos - self.max_chunk) / z + 1;
        by_zeros.min(by_window) * z
    }

    /// The device's size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Bytes in the changed ranges.
    pub fn changed_bytes(&self) -> u64 {
        self.changed.iter().map(|r| r.end - r.start).sum()
    }

    fn span_end(&self, index: usize) -> u64 {
        self.spans.get(index + 1).map_or(self.size, |s| s.0)
    }

    /// The first changed byte at or after the change `change` (none: past
    /// every offset).
    fn change_start(&self, change: usize) -> u64 {
        self.changed.get(change).map_or(u64::MAX, |r| r.start)
    }
}

/// Sorts, clips to `0..size` and merges (offset, length) ranges, dropping
/// empty ones.
fn merge_ranges(ranges: &[(u64, u64)], size: u64) -> Vec<Range<u64>> {
    let mut clipped: Vec<Range<u64>> = ranges
        .iter()
        .map(|&(offset, length)| offset.min(size)..offset.saturating_add(length).min(size))
        .filter(|r| !r.is_empty())
        .collect();
    clipped.sort_by_key(|r| r.start);
    let mut merged: Vec<Range<u64>> = Vec::with_capacity(clipped.len());
    for r in clipped {
        match merged.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => merged.push(r),
        }
    }
    merged
}

/// Appends `piece`, merging a run of zeros into the run before it (as a
/// full read does).
pub(super) fn push_piece(pieces: &mut Vec<Piece>, piece: Piece) {
    if let (Piece::Zeros(n), Some(Piece::Zeros(last))) = (piece, pieces.last_mut()) {
        *last += n;
        return;
    }
    pieces.push(piece);
}

/// What [`read_changed`] did.
#[derive(Debug, Default, PartialEq)]
pub struct DeltaRead {
    pub pieces: Vec<Piece>,
    /// Bytes read from the device, read-ahead included.
    pub bytes_read: u64,
    /// Bytes and chunks taken over from the parent unread.
    pub bytes_reused: u64,
    pub chunks_reused: u64,
}

/// Reads the device `source` around the changes of `delta`, cutting what
/// it reads with `chunker` and handing each chunk to `new_chunk` (which
/// names or stores it and returns its piece); the parent's pieces fill
/// the rest. `reused` is told the length of every stretch taken over.
pub fn read_changed<R: Read + Seek, E>(
    mut source: R,
    delta: &BlockDelta,
    chunker: &mut Chunker,
    mut new_chunk: impl FnMut(&[u8]) -> Result<Piece, E>,
    mut reused: impl FnMut(u64),
    read_error: impl Fn(std::io::Error) -> E,
) -> Result<DeltaRead, E> {
    let mut out = DeltaRead::default();
    let (mut change, mut pos) = (0usize, 0u64);
    // The first changed byte from `at` on.
    let next_change = |change: &mut usize, at: u64| {
        while delta.changed.get(*change).is_some_and(|r| r.end <= at) {
            *change += 1;
        }
        delta.change_start(*change)
    };
    // `pos` is always a cut of the new content.
    while pos < delta.size {
        let upto = next_change(&mut change, pos);
        if let Some(mut span) = delta.reusable_at(pos, upto) {
            while span < delta.spans.len() && delta.span_end(span) < upto {
                let (start, piece) = delta.spans[span];
                let end = delta.span_end(span);
                push_piece(&mut out.pieces, piece);
                out.bytes_reused += end - start;
                out.chunks_reused += u64::from(matches!(piece, Piece::Chunk(_)));
                reused(end - start);
                pos = end;
                span += 1;
            }
            continue;
        }
        let zeros = delta.zeros_at(pos, upto);
        if zeros > 0 {
            push_piece(&mut out.pieces, Piece::Zeros(zeros));
            out.bytes_reused += zeros;
            reused(zeros);
            pos += zeros;
            continue;
        }
        // A change is near: re-cut from here until a cut is in step with
        // the parent again (or in known zeros).
        source.seek(SeekFrom::Start(pos)).map_err(&read_error)?;
        let reader = (&mut source).take(delta.size - pos);
        let mut in_step = false;
        let read = chunker.chunks_until(
            reader,
            |chunk| {
                let piece = new_chunk(chunk)?;
                push_piece(&mut out.pieces, piece);
                pos += chunk.len() as u64;
                if pos >= delta.size {
                    return Ok(false);
                }
                let upto = next_change(&mut change, pos);
                in_step = delta.reusable_at(pos, upto).is_some() || delta.zeros_at(pos, upto) > 0;
                Ok(!in_step)
            },
            &read_error,
        )?;
        out.bytes_read += read;
        if pos < delta.size && !in_step {
            // The reader ended early: the device is shorter than it was.
            return Err(read_error(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("the device ended at byte {pos} of {}", delta.size),
            )));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_data::pseudo_random;
    use std::collections::HashMap;
    use std::io::Cursor;

    fn chunker() -> Chunker {
        Chunker::with_sizes(9, 1024, 4096, 16384)
    }

    fn id(chunk: &[u8]) -> BlobId {
        BlobId(*blake3::hash(chunk).as_bytes())
    }

    /// Names a chunk as the backup does: zeros are a hole.
    fn piece(chunk: &[u8], lengths: &mut HashMap<BlobId, u64>) -> Piece {
        if chunk.iter().all(|b| *b == 0) {
            return Piece::Zeros(chunk.len() as u64);
        }
        lengths.insert(id(chunk), chunk.len() as u64);
        Piece::Chunk(id(chunk))
    }

    /// Every chunk of `data`, as a full read cuts it.
    fn full(data: &[u8], lengths: &mut HashMap<BlobId, u64>) -> Vec<Piece> {
        let mut pieces = Vec::new();
        chunker()
            .chunks(
                data,
                |c| {
                    push_piece(&mut pieces, piece(c, lengths));
                    Ok::<_, std::io::Error>(())
                },
                |e| e,
            )
            .unwrap();
        pieces
    }

    fn changed_read(
        parent: &[Piece],
        lengths: &HashMap<BlobId, u64>,
        data: &[u8],
        changes: &[(u64, u64)],
    ) -> DeltaRead {
        let delta = BlockDelta::new(
            parent,
            |id| lengths.get(id).copied(),
            &chunker(),
            data.len() as u64,
            changes,
        )
        .unwrap();
        let mut fresh = HashMap::new();
        let mut least = chunker();
        least.read_least();
        read_changed(
            Cursor::new(data),
            &delta,
            &mut least,
            |c| Ok::<_, std::io::Error>(piece(c, &mut fresh)),
            |_| {},
            |e| e,
        )
        .unwrap()
    }

    /// A device with data, a long zeroed stretch and more data.
    fn device() -> Vec<u8> {
        let mut data = pseudo_random(600_000, 3);
        data[200_000..320_000].fill(0);
        data
    }

    #[test]
    fn reading_only_the_changes_gives_the_chunks_of_a_full_read() {
        let before = device();
        let mut lengths = HashMap::new();
        let parent = full(&before, &mut lengths);
        let edits: &[&[(usize, usize)]] = &[
            &[],
            &[(0, 1)],
            &[(599_999, 1)],
            &[(100_000, 4096)],
            &[(250_000, 10)],
            &[(199_990, 20), (320_000, 3)],
            &[(10_000, 50), (10_100, 7), (400_000, 70_000)],
            &[(0, 600_000)],
        ];
        for (n, edit) in edits.iter().enumerate() {
            let mut after = before.clone();
            let mut state = 17 + n as u64;
            for &(offset, len) in *edit {
                for b in &mut after[offset..offset + len] {
                    state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
                    *b = (state >> 56) as u8 | 1;
                }
            }
            let changes: Vec<(u64, u64)> =
                edit.iter().map(|&(o, l)| (o as u64, l as u64)).collect();
            let expected = full(&after, &mut HashMap::new());
            let read = changed_read(&parent, &lengths, &after, &changes);
            assert_eq!(read.pieces, expected, "edit {edit:?}");
            if edit.is_empty() {
                assert_eq!(read.bytes_read, 0);
                assert_eq!(read.bytes_reused, 600_000);
            }
            if edit == &[(100_000, 4096)] {
                assert!(
                    read.bytes_read < 100_000,
                    "a 4 KiB change read {} bytes",
                    read.bytes_read
                );
                assert!(read.chunks_reused > 0);
            }
        }
    }

    #[test]
    fn a_change_of_the_byte_after_a_cut_is_read_with_the_chunk_before_it() {
        // The cut at the end of a chunk is decided with the byte after it:
        // changing only that byte may move the cut.
        let before = pseudo_random(400_000, 21);
        let mut lengths = HashMap::new();
        let parent = full(&before, &mut lengths);
        let mut cuts = Vec::new();
        let mut offset = 0u64;
        for piece in &parent {
            let Piece::Chunk(id) = piece else { continue };
            offset += lengths[id];
            cuts.push(offset);
        }
        cuts.pop();
        assert!(cuts.len() > 10, "{} cuts", cuts.len());
        let mut moved = 0;
        for &cut in &cuts {
            let mut after = before.clone();
            after[cut as usize] ^= 0x55;
            let expected = full(&after, &mut HashMap::new());
            if expected[..] != parent[..] && expected.len() != parent.len() {
                moved += 1;
            }
            let read = changed_read(&parent, &lengths, &after, &[(cut, 1)]);
            assert_eq!(read.pieces, expected, "byte {cut} changed");
        }
        assert!(moved > 0, "no change of a byte after a cut moved the cut");
    }

    #[test]
    fn without_a_parent_only_the_blocks_that_hold_data_are_read() {
        // Data, a long hole, data, a hole up to the end: against an empty
        // device, the allocated ranges are the changes.
        let mut data = pseudo_random(70_000, 8);
        data.extend(std::iter::repeat_n(0u8, 500_000));
        data.extend(pseudo_random(30_001, 9));
        data.extend(std::iter::repeat_n(0u8, 333_333));
        let size = data.len() as u64;
        let empty = [Piece::Zeros(size)];
        let allocated = [(0, 70_000), (570_000, 30_001)];
        let read = changed_read(&empty, &HashMap::new(), &data, &allocated);
        assert_eq!(read.pieces, full(&data, &mut HashMap::new()));
        assert!(
            read.bytes_read < 200_000,
            "read {} of {size} bytes",
            read.bytes_read
        );
        // Ranges that say more than is allocated, anywhere in the holes,
        // cost reads, not correctness.
        let expected = full(&data, &mut HashMap::new());
        for start in (0..size).step_by(37_001) {
            let ranges = [allocated[0], allocated[1], (start, 5)];
            let read = changed_read(&empty, &HashMap::new(), &data, &ranges);
            assert_eq!(read.pieces, expected, "extra range at {start}");
        }
    }

    #[test]
    fn a_write_into_a_long_hole_reads_only_around_the_write() {
        let mut before = pseudo_random(50_000, 5);
        before.extend(std::iter::repeat_n(0u8, 2_000_000));
        before.extend(pseudo_random(50_000, 6));
        let mut lengths = HashMap::new();
        let parent = full(&before, &mut lengths);
        let mut after = before.clone();
        after[1_000_003..1_000_010].copy_from_slice(b"written");
        let read = changed_read(&parent, &lengths, &after, &[(1_000_000, 4096)]);
        assert_eq!(read.pieces, full(&after, &mut HashMap::new()));
        assert!(
            read.bytes_read <= 4 * 16384,
            "a write into a hole read {} bytes",
            read.bytes_read
        );
    }

    #[test]
    fn ranges_that_say_more_than_changed_cost_reads_not_correctness() {
        let before = device();
        let mut lengths = HashMap::new();
        let parent = full(&before, &mut lengths);
        let mut after = before.clone();
        after[450_000] ^= 0xff;
        // Overlapping, unsorted, past the end, empty: all fine.
        let changes = [
            (500_000, 10),
            (449_000, 2_000),
            (449_500, 10),
            (590_000, 100_000),
            (5, 0),
        ];
        let read = changed_read(&parent, &lengths, &after, &changes);
        assert_eq!(read.pieces, full(&after, &mut HashMap::new()));
    }

    #[test]
    fn a_parent_that_does_not_fit_the_device_is_refused_with_the_reason() {
        let before = device();
        let mut lengths = HashMap::new();
        let parent = full(&before, &mut lengths);
        let err = BlockDelta::new(
            &parent,
            |id| lengths.get(id).copied(),
            &chunker(),
            700_000,
            &[],
        )
        .unwrap_err();
        assert!(
            err.contains("600000 bytes") && err.contains("700000"),
            "{err}"
        );
        let err = BlockDelta::new(&parent, |_| None, &chunker(), 600_000, &[]).unwrap_err();
        assert!(err.contains("marked for deletion"), "{err}");
    }

    #[test]
    fn a_device_shorter_than_its_delta_is_an_error_not_a_short_volume() {
        let before = device();
        let mut lengths = HashMap::new();
        let parent = full(&before, &mut lengths);
        let delta = BlockDelta::new(
            &parent,
            |id| lengths.get(id).copied(),
            &chunker(),
            600_000,
            &[(599_000, 10)],
        )
        .unwrap();
        let err = read_changed(
            Cursor::new(&before[..550_000]),
            &delta,
            &mut chunker(),
            |c| Ok::<_, std::io::Error>(piece(c, &mut HashMap::new())),
            |_| {},
            |e| e,
        )
        .unwrap_err();
        assert!(err.to_string().contains("ended at byte"), "{err}");
    }

    #[test]
    fn ranges_are_clipped_sorted_and_merged() {
        assert_eq!(
            merge_ranges(&[(10, 5), (0, 3), (12, 10), (3, 1), (50, 0), (90, 20)], 100),
            vec![0..4, 10..22, 90..100]
        );
    }
}
