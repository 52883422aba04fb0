//! Reading many blobs at once: the blobs are grouped by pack and the ones
//! lying close together are fetched with one ranged read, so that reading a
//! snapshot costs about one request per region of a pack, not one per
//! object (on S3 a request costs more than the bytes it moves).

use futures::StreamExt;

use super::{BlobId, IndexEntry, RepoError, Repository, decode_blob, pack_path};

/// Blobs further apart than this in a pack are read with separate requests:
/// below it, reading the gap costs less than another request.
const MAX_GAP: u64 = 256 * 1024;
/// The most one request reads: bounds the memory of a read in flight.
const MAX_REGION: u64 = 8 * 1024 * 1024;
/// Ranged reads in flight at once.
const READS_AT_ONCE: usize = 4;
/// A region's blobs are decoded by one thread per this many stored bytes
/// (up to one per core): smaller parts cost more to hand out than they save.
const DECODE_MIN: u64 = 1 << 20;

/// A read blob, by its position in the request.
type Read = (usize, Result<Vec<u8>, RepoError>);

/// One ranged read: a stretch of a pack and the requested blobs in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Region {
    pub pack: u32,
    pub start: u64,
    pub end: u64,
    /// (position in the request, where the blob is).
    pub blobs: Vec<(usize, BlobSpan)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BlobSpan {
    pub offset: u64,
    pub length: u64,
    pub raw_length: u32,
}

/// Groups blobs (position, pack, span) into regions: per pack, in offset
/// order, a new region where the gap exceeds `max_gap` or the region would
/// exceed `max_len`.
pub(crate) fn regions(
    mut blobs: Vec<(usize, u32, BlobSpan)>,
    max_gap: u64,
    max_len: u64,
) -> Vec<Region> {
    blobs.sort_by_key(|(_, pack, span)| (*pack, span.offset));
    let mut out: Vec<Region> = Vec::new();
    for (position, pack, span) in blobs {
        let end = span.offset + span.length;
        match out.last_mut() {
            Some(r)
                if r.pack == pack
                    && span.offset <= r.end + max_gap
                    && end.max(r.end) - r.start <= max_len =>
            {
                r.end = r.end.max(end);
                r.blobs.push((position, span));
            }
            _ => out.push(Region {
                pack,
                start: span.offset,
                end,
                blobs: vec![(position, span)],
            }),
        }
    }
    out
}

impl Repository {
    /// Where a blob lies (pack number, offset): sorting reads by it makes
    /// consecutive reads fall into the same regions.
    pub fn blob_position(&self, id: &BlobId) -> Option<(u32, u32)> {
        let index = self.inner.index.read().expect("index lock");
        index.blobs.get(id).map(|e| (e.pack, e.offset))
    }

    /// Reads and verifies many blobs with few requests; the results are in
    /// the order of `ids`. A damaged blob fails alone.
    pub async fn read_blobs(&self, ids: &[BlobId]) -> Vec<Result<Vec<u8>, RepoError>> {
        let mut results: Vec<Option<Result<Vec<u8>, RepoError>>> =
            (0..ids.len()).map(|_| None).collect();
        let (located, packs) = {
            let index = self.inner.index.read().expect("index lock");
            let mut located = Vec::with_capacity(ids.len());
            for (position, id) in ids.iter().enumerate() {
                if !index.loaded {
                    results[position] = Some(Err(RepoError::NotLocked));
                    continue;
                }
                match index.blobs.get(id) {
                    Some(IndexEntry {
                        pack,
                        offset,
                        length,
                        raw_length,
                    }) => located.push((
                        position,
                        *pack,
                        BlobSpan {
                            offset: u64::from(*offset),
                            length: u64::from(*length),
                            raw_length: *raw_length,
                        },
                    )),
                    None => results[position] = Some(Err(RepoError::BlobNotFound { blob: *id })),
                }
            }
            (located, index.packs.clone())
        };
        let reads = regions(located, MAX_GAP, MAX_REGION);
        let decoded: Vec<Vec<Read>> = futures::stream::iter(reads)
            .map(|region| {
                let pack = packs[region.pack as usize].clone();
                async move { self.read_region(ids, &pack, region).await }
            })
            .buffer_unordered(READS_AT_ONCE)
            .collect()
            .await;
        for (position, result) in decoded.into_iter().flatten() {
            results[position] = Some(result);
        }
        results
            .into_iter()
            .map(|r| r.expect("every requested blob has a result"))
            .collect()
    }

    async fn read_region(&self, ids: &[BlobId], pack: &str, region: Region) -> Vec<Read> {
        let fetched = self
            .inner
            .backend
            .get_range(&pack_path(pack), region.start, region.end - region.start)
            .await;
        let bytes = match fetched {
            Ok(b) => b,
            Err(e) => {
                return region
                    .blobs
                    .iter()
                    .map(|(position, _)| {
                        (
                            *position,
                            Err(RepoError::Damaged {
                                blob: ids[*position],
                                pack: pack.to_string(),
                                message: e.to_string(),
                            }),
                        )
                    })
                    .collect();
            }
        };
        let wanted: Vec<(usize, BlobId, BlobSpan)> = region
            .blobs
            .iter()
            .map(|(position, span)| (*position, ids[*position], *span))
            .collect();
        // A region is decoded on every core: a restore reading one large
        // file asks for one region at a time, and decrypting, decompressing
        // and hashing it are most of a restore's work.
        let cores = crate::cores();
        let stored: u64 = wanted.iter().map(|(_, _, span)| span.length).sum();
        let groups = cores
            .min(wanted.len())
            .min(stored.div_ceil(DECODE_MIN) as usize)
            .max(1);
        let per_group = stored.div_ceil(groups as u64);
        let mut parts: Vec<Vec<(usize, BlobId, BlobSpan)>> = vec![Vec::new()];
        let mut part_bytes = 0;
        for blob in wanted {
            if part_bytes >= per_group {
                parts.push(Vec::new());
                part_bytes = 0;
            }
            part_bytes += blob.2.length;
            parts.last_mut().expect("one part at least").push(blob);
        }
        let decoded = futures::future::join_all(parts.into_iter().map(|part| {
            let (key, bytes, pack) = (self.inner.key.clone(), bytes.clone(), pack.to_string());
            let start = region.start;
            tokio::task::spawn_blocking(move || {
                part.into_iter()
                    .map(|(position, blob, span)| {
                        let from = (span.offset - start) as usize;
                        let to = from + span.length as usize;
                        let result = match bytes.get(from..to) {
                            Some(stored) => decode_blob(&key, &blob, stored, span.raw_length),
                            None => Err(format!(
                                "the pack is shorter than its index says ({} bytes read, blob ends at {to})",
                                bytes.len()
                            )),
                        };
                        (
                            position,
                            result.map_err(|message| RepoError::Damaged {
                                blob,
                                pack: pack.clone(),
                                message,
                            }),
                        )
                    })
                    .collect::<Vec<Read>>()
            })
        }))
        .await;
        decoded
            .into_iter()
            .flat_map(|part| part.expect("decode task"))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(offset: u64, length: u64) -> BlobSpan {
        BlobSpan {
            offset,
            length,
            raw_length: 0,
        }
    }

    #[test]
    fn neighbouring_blobs_of_a_pack_are_read_together() {
        let blobs = vec![
            (0, 1, span(5000, 100)),
            (1, 0, span(0, 100)),
            (2, 0, span(100, 50)),
            (3, 0, span(1000, 10)),
        ];
        let got = regions(blobs, 1000, 1 << 20);
        assert_eq!(got.len(), 2);
        assert_eq!((got[0].pack, got[0].start, got[0].end), (0, 0, 1010));
        assert_eq!(
            got[0].blobs.iter().map(|b| b.0).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        assert_eq!((got[1].pack, got[1].start, got[1].end), (1, 5000, 5100));
    }

    #[test]
    fn a_wide_gap_or_a_full_region_starts_another_read() {
        let far = regions(
            vec![(0, 0, span(0, 10)), (1, 0, span(5000, 10))],
            100,
            1 << 20,
        );
        assert_eq!(far.len(), 2);
        let full = regions(
            vec![(0, 0, span(0, 600)), (1, 0, span(600, 600))],
            100,
            1000,
        );
        assert_eq!(full.len(), 2);
        assert_eq!(full[1].start, 600);
    }
}
