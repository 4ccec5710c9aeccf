//! Helpers shared by the fuzz targets (included with `#[path]`, not a target).
#![allow(dead_code)]

/// Deterministic xorshift64* stream, seeded from input header bytes, used to
/// derive chunk sizes and driver decisions. libFuzzer mutates the seed bytes,
/// so every split/decision pattern stays reachable and reproducible.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: &[u8]) -> Self {
        let mut s: u64 = 0x9E37_79B9_7F4A_7C15;
        for &b in seed {
            s = (s ^ u64::from(b)).wrapping_mul(0x0100_0000_01B3);
        }
        Rng(s | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform-ish in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    pub fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }
}

/// Split `data` into chunks of 1..=max bytes (max >= 1).
pub fn chunks<'a>(data: &'a [u8], rng: &mut Rng, max: usize) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        let n = 1 + rng.below(rest.len().min(max.max(1)));
        out.push(&rest[..n]);
        rest = &rest[n..];
    }
    out
}

/// Every line ends in CRLF, there is no bare CR or LF, no other control
/// character, and the bytes are UTF-8. Returns a description of the problem.
pub fn check_crlf_lines(out: &[u8]) -> Result<(), String> {
    if out.is_empty() {
        return Ok(());
    }
    let s = std::str::from_utf8(out).map_err(|e| format!("output not UTF-8: {e}"))?;
    if !s.ends_with("\r\n") {
        return Err(format!("output does not end with CRLF: {s:?}"));
    }
    for line in s[..s.len() - 2].split("\r\n") {
        if line.is_empty() {
            return Err(format!("empty output line in {s:?}"));
        }
        if let Some(c) = line.chars().find(|c| c.is_control()) {
            return Err(format!("control character {c:?} in output line {line:?}"));
        }
    }
    Ok(())
}
