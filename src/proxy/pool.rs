//! Relay buffers, lent only while bytes flow: an idle session holds none,
//! and a busy one gets the same buffer back without allocating or zeroing
//! it again each time its reads catch up with the peer.
//!
//! One small pool per worker thread (no lock on the hot path), bounded per
//! size so that it never holds more than [`MAX_HELD_BYTES`] per thread,
//! whatever the number of sessions: buffers beyond the bound are freed.

use std::cell::RefCell;

/// The buffer sizes the relay uses: `RELAY_MIN` growing fourfold up to
/// `RELAY_MAX` (see [`super::relay`]).
const SIZES: [usize; 4] = [8 * 1024, 32 * 1024, 128 * 1024, 256 * 1024];
/// How many spare buffers of each size a thread keeps.
const KEEP: [usize; 4] = [64, 8, 2, 2];
/// The most a thread's pool holds: 512 + 256 + 256 + 512 KiB.
#[cfg_attr(not(test), allow(dead_code))]
pub const MAX_HELD_BYTES: usize = 1536 * 1024;

thread_local! {
    static SPARE: RefCell<[Vec<Vec<u8>>; 4]> = const { RefCell::new([Vec::new(), Vec::new(), Vec::new(), Vec::new()]) };
}

fn class(len: usize) -> Option<usize> {
    SIZES.iter().position(|&s| s == len)
}

/// A buffer of `len` bytes (contents unspecified): a spare one when there
/// is one, else a new one.
pub fn take(len: usize) -> Vec<u8> {
    let spare = class(len).and_then(|c| SPARE.with(|p| p.borrow_mut()[c].pop()));
    spare.unwrap_or_else(|| vec![0; len])
}

/// Gives a buffer back: kept for the next [`take`] of its size while this
/// thread's pool has room, else freed.
pub fn give(buf: Vec<u8>) {
    if let Some(c) = class(buf.len()) {
        SPARE.with(|p| {
            let mut p = p.borrow_mut();
            if p[c].len() < KEEP[c] {
                p[c].push(buf);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pool_is_bounded_and_reuses_buffers() {
        let held: usize = SIZES.iter().zip(KEEP).map(|(s, k)| s * k).sum();
        assert_eq!(held, MAX_HELD_BYTES);
        let many: Vec<Vec<u8>> = (0..200).map(|_| take(8 * 1024)).collect();
        for b in many {
            give(b);
        }
        assert_eq!(SPARE.with(|p| p.borrow()[0].len()), KEEP[0]);
        let b = take(8 * 1024);
        let ptr = b.as_ptr();
        give(b);
        let again = take(8 * 1024);
        assert_eq!(again.as_ptr(), ptr, "a spare buffer is lent again");
        // Sizes the relay never uses are not kept.
        give(vec![0; 1000]);
        assert_eq!(take(1000).len(), 1000);
    }
}
