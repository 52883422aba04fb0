//! Data for unit tests.

/// `len` bytes of xorshift output from `state`: the same bytes on every
/// run, and nothing a compressor or a chunker finds structure in.
pub(crate) fn pseudo_random(len: usize, mut state: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}
