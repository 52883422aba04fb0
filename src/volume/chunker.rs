//! Content-defined chunking of a stream with one reused buffer: the cut
//! points depend on the content (FastCDC 2020), so an insertion early in a
//! file moves only the chunks around it.

use std::borrow::Cow;
use std::io::Read;

use fastcdc::v2020::{Normalization, cut_gear, get_gear_with_seed, select_masks};

/// Chunks are at least this long, except the last of a file.
pub const MIN_CHUNK: usize = 256 * 1024;
/// The average chunk length the cut points aim at.
pub const AVG_CHUNK: usize = 1024 * 1024;
/// No chunk is longer.
pub const MAX_CHUNK: usize = 4 * 1024 * 1024;

pub struct Chunker {
    gear: Cow<'static, [u64]>,
    gear_ls: Cow<'static, [u64]>,
    mask_s: u64,
    mask_l: u64,
    min: usize,
    avg: usize,
    max: usize,
    buffer: Vec<u8>,
    /// Read no further than each cut needs (see [`Chunker::read_least`]).
    least: bool,
    /// [`Chunker::zero_chunk_len`], found once: every sparse file a reader
    /// reads asks for it.
    zero_chunk: std::cell::OnceCell<usize>,
}

impl Chunker {
    pub fn new(seed: u64) -> Self {
        Self::with_sizes(seed, MIN_CHUNK, AVG_CHUNK, MAX_CHUNK)
    }

    pub fn with_sizes(seed: u64, min: usize, avg: usize, max: usize) -> Self {
        let (gear, gear_ls) = get_gear_with_seed(seed);
        let (mask_s, mask_l) = select_masks(avg, Normalization::Level1);
        Chunker {
            gear,
            gear_ls,
            mask_s,
            mask_l,
            min,
            avg,
            max,
            buffer: Vec::new(),
            least: false,
            zero_chunk: std::cell::OnceCell::new(),
        }
    }

    /// The largest chunk's length.
    pub fn max_len(&self) -> usize {
        self.max
    }

    /// The length of every chunk but the last of a run of zeros: where a
    /// cut falls in zeros when more zeros follow. Such a run is cut at
    /// multiples of this length from its start.
    pub fn zero_chunk_len(&self) -> usize {
        *self
            .zero_chunk
            .get_or_init(|| self.cut_point(&vec![0u8; self.max + 1]))
    }

    /// The length of the chunk at the start of `window`, which holds the
    /// largest chunk's length or everything left.
    fn cut_point(&self, window: &[u8]) -> usize {
        let (_, cut) = cut_gear(
            window,
            self.min,
            self.avg,
            self.max,
            self.mask_s,
            self.mask_l,
            self.mask_s << 1,
            self.mask_l << 1,
            &self.gear,
            &self.gear_ls,
        );
        if cut == 0 { window.len() } else { cut }
    }

    /// Reads no further ahead than each cut needs, for reads that stop
    /// early ([`Chunker::chunks_until`]), where bytes read and not cut are
    /// wasted. By default the source is read twice the largest chunk ahead
    /// (fewer, larger reads). Here a cut is first looked for in the
    /// average chunk's length, then in twice that, up to the largest: a
    /// cut found in a window of at least the average length is the cut a
    /// full window finds (the scan is the same up to the window's end).
    pub fn read_least(&mut self) {
        self.least = true;
    }

    /// Cuts everything `source` yields into chunks, calling `each` with
    /// every chunk in order. Returns the bytes read.
    pub fn chunks<R: Read, E>(
        &mut self,
        source: R,
        mut each: impl FnMut(&[u8]) -> Result<(), E>,
        read_error: impl Fn(std::io::Error) -> E,
    ) -> Result<u64, E> {
        self.chunks_until(source, |chunk| each(chunk).map(|()| true), read_error)
    }

    /// Like [`Chunker::chunks`], but stops after the first chunk for which
    /// `each` returns `false`. Returns the bytes read, read-ahead included.
    /// A cut depends only on the bytes from the chunk's start, so chunking
    /// that starts at an earlier cut point finds the same cuts again.
    pub fn chunks_until<R: Read, E>(
        &mut self,
        mut source: R,
        mut each: impl FnMut(&[u8]) -> Result<bool, E>,
        read_error: impl Fn(std::io::Error) -> E,
    ) -> Result<u64, E> {
        // Twice the largest chunk: a cut is always made in a full window.
        let capacity = 2 * self.max;
        if self.buffer.len() < capacity {
            self.buffer.resize(capacity, 0);
        }
        let mut start = 0;
        let mut end = 0;
        let mut eof = false;
        let mut total = 0u64;
        let first_need = if self.least { self.avg } else { self.max };
        let mut need = first_need;
        loop {
            if !eof && end - start < need {
                if start > 0 {
                    self.buffer.copy_within(start..end, 0);
                    end -= start;
                    start = 0;
                }
                let goal = if self.least { need } else { capacity };
                while end < goal {
                    match source.read(&mut self.buffer[end..goal]) {
                        Ok(0) => {
                            eof = true;
                            break;
                        }
                        Ok(n) => {
                            end += n;
                            total += n as u64;
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(read_error(e)),
                    }
                }
            }
            if start == end {
                return Ok(total);
            }
            let window = &self.buffer[start..end];
            let cut = self.cut_point(window);
            if cut == window.len() && !eof && window.len() < self.max {
                // A short window without a cut: not a cut, read on.
                need = (need * 2).min(self.max);
                continue;
            }
            if !each(&window[..cut])? {
                return Ok(total);
            }
            start += cut;
            need = first_need;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_data::pseudo_random;

    fn cut(data: &[u8], seed: u64) -> Vec<Vec<u8>> {
        let mut chunker = Chunker::with_sizes(seed, 1024, 4096, 16384);
        let mut out = Vec::new();
        chunker
            .chunks(
                data,
                |c| {
                    out.push(c.to_vec());
                    Ok::<_, std::io::Error>(())
                },
                |e| e,
            )
            .unwrap();
        out
    }

    #[test]
    fn chunks_cover_the_input_in_order_within_the_size_bounds() {
        let data = pseudo_random(300_000, 7);
        let chunks = cut(&data, 1);
        assert_eq!(chunks.concat(), data);
        for c in &chunks[..chunks.len() - 1] {
            assert!((1024..=16384).contains(&c.len()), "{}", c.len());
        }
        assert!(cut(&[], 1).is_empty());
        assert_eq!(cut(b"tiny", 1), vec![b"tiny".to_vec()]);
    }

    #[test]
    fn an_insertion_moves_only_the_chunks_around_it() {
        let data = pseudo_random(400_000, 11);
        let mut edited = data[..200_000].to_vec();
        edited.extend_from_slice(b"inserted bytes");
        edited.extend_from_slice(&data[200_000..]);
        let before = cut(&data, 3);
        let after = cut(&edited, 3);
        let shared = after.iter().filter(|c| before.contains(c)).count();
        assert!(
            shared + 3 >= before.len(),
            "{shared} of {} chunks survive an insertion",
            before.len()
        );
    }

    #[test]
    fn reading_no_further_ahead_than_a_cut_needs_cuts_the_same() {
        let data = pseudo_random(300_000, 13);
        let mut least = Chunker::with_sizes(1, 1024, 4096, 16384);
        least.read_least();
        let mut out = Vec::new();
        let read = least
            .chunks_until(
                &data[..],
                |c| {
                    out.push(c.to_vec());
                    Ok::<_, std::io::Error>(out.len() < 3)
                },
                |e| e,
            )
            .unwrap();
        assert_eq!(out[..], cut(&data, 1)[..3]);
        let cut_len: usize = out.iter().map(Vec::len).sum();
        assert!(
            read as usize <= cut_len - out[2].len() + 16384,
            "read {read} bytes for {cut_len} bytes of chunks"
        );
        // The whole stream, in reads of any size, cuts the same too.
        struct Dribble<'a>(&'a [u8], usize);
        impl Read for Dribble<'_> {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                let n = buf.len().min(self.1).min(self.0.len());
                buf[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        for step in [1, 777, 4096, 70_000] {
            let mut least = Chunker::with_sizes(1, 1024, 4096, 16384);
            least.read_least();
            let mut all = Vec::new();
            least
                .chunks(
                    Dribble(&data, step),
                    |c| {
                        all.push(c.to_vec());
                        Ok::<_, std::io::Error>(())
                    },
                    |e| e,
                )
                .unwrap();
            assert_eq!(all, cut(&data, 1), "reads of {step} bytes");
        }
    }

    #[test]
    fn the_seed_moves_the_cut_points() {
        let data = pseudo_random(200_000, 5);
        assert_ne!(cut(&data, 1), cut(&data, 2));
    }
}
