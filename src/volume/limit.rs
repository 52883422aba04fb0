//! What this machine's CPUs allow the data mover: chunking, hashing,
//! compressing and sealing data already in memory, on every core, with no
//! disk and no repository. A backup's throughput is judged against it.

use std::path::Path;
use std::time::Instant;

use serde::Serialize;

use super::VolumeError;
use super::chunker::Chunker;
use crate::repo::Repository;

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PipelineLimit {
    pub bytes: u64,
    pub threads: usize,
    pub seconds: f64,
    pub mib_per_second: f64,
}

/// Reads up to `cap` bytes of the files under `dir` into memory, then
/// measures chunk + hash + compress + seal over them on `threads` threads.
pub fn measure(
    repo: &Repository,
    dir: &Path,
    cap: u64,
    threads: usize,
) -> Result<PipelineLimit, VolumeError> {
    let mut files: Vec<Vec<u8>> = Vec::new();
    let mut total = 0u64;
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(&d)
            .map_err(|e| VolumeError::io(&d, e))?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .collect();
        entries.sort();
        for path in entries {
            if total >= cap {
                break;
            }
            let Ok(m) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            if m.is_dir() {
                pending.push(path);
            } else if m.is_file() {
                let data = std::fs::read(&path).map_err(|e| VolumeError::io(&path, e))?;
                total += data.len() as u64;
                files.push(data);
            }
        }
    }
    let threads = threads.max(1);
    let seed = repo.chunker_seed();
    let started = Instant::now();
    std::thread::scope(|scope| {
        for share in 0..threads {
            let files = &files;
            scope.spawn(move || {
                let mut chunker = Chunker::new(seed);
                for data in files.iter().skip(share).step_by(threads) {
                    let _ = chunker.chunks(
                        &data[..],
                        |chunk| {
                            let id = repo.blob_id(chunk);
                            std::hint::black_box((id, repo.encode_chunk(chunk)));
                            Ok::<_, std::io::Error>(())
                        },
                        |e| e,
                    );
                }
            });
        }
    });
    let seconds = started.elapsed().as_secs_f64();
    Ok(PipelineLimit {
        bytes: total,
        threads,
        seconds,
        mib_per_second: total as f64 / (1024.0 * 1024.0) / seconds.max(1e-9),
    })
}
