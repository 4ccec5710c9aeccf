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

/// The input of the upstream targets, `[max byte] [seed byte] stream...`.
pub struct Upstream<'a> {
    /// The second header byte, to seed further streams from.
    pub seed: u8,
    pub stream: &'a [u8],
    /// Stands in for the proxy's response bound: 64 KiB when the first byte's
    /// high bit is set, else small enough that the limits are reachable.
    pub max: usize,
    pub max_chunk: usize,
    /// `stream` cut the way the header bytes pick.
    pub chunks: Vec<&'a [u8]>,
}

impl<'a> Upstream<'a> {
    /// `None` for an input too short to hold the header. A small `max` is
    /// `least + 8 * byte`.
    pub fn parse(data: &'a [u8], least: usize) -> Option<Self> {
        if data.len() < 2 {
            return None;
        }
        let (hdr, stream) = data.split_at(2);
        let max = if hdr[0] & 0x80 != 0 {
            65536
        } else {
            least + 8 * usize::from(hdr[0])
        };
        let mut rng = Rng::new(hdr);
        let max_chunk = [1, 7, 64, 4096][rng.below(4)];
        let chunks = chunks(stream, &mut rng, max_chunk);
        Some(Upstream {
            seed: hdr[1],
            stream,
            max,
            max_chunk,
            chunks,
        })
    }
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

/// Reads `stream` the way the proxy reads an upstream before login
/// (`upstream::conn::Conn::read`): the bytes arrive in `chunks`, and after
/// each one `framer` is asked for complete frames at the start of the
/// buffer, which are consumed, until it wants more.
///
/// Checks on every answer:
/// * a frame is `0 < len <= buffered`, and it is the frame (and value) the
///   framer finds in the whole rest of the stream: what is read must not
///   depend on how the network cut the bytes;
/// * an error is also an error on the whole rest of the stream;
/// * asking for more holds at most `bound` bytes (the proxy's memory bound).
///
/// `each` sees every frame with its bytes; returning `false` stops the
/// reading (as the proxy stops on a BYE or a refused greeting).
pub fn read_frames<T, E>(
    stream: &[u8],
    chunks: &[&[u8]],
    bound: usize,
    mut framer: impl FnMut(&[u8]) -> Result<Option<(usize, T)>, E>,
    mut each: impl FnMut(&[u8], T) -> bool,
) where
    T: PartialEq + std::fmt::Debug,
{
    let mut consumed = 0;
    let mut fed = 0;
    for c in chunks {
        fed += c.len();
        loop {
            let buf = &stream[consumed..fed];
            match framer(buf) {
                Ok(Some((len, v))) => {
                    assert!(
                        len > 0 && len <= buf.len(),
                        "frame length {len} of {} buffered",
                        buf.len()
                    );
                    match framer(&stream[consumed..]) {
                        Ok(Some((whole_len, whole))) => {
                            assert_eq!(
                                (len, &v),
                                (whole_len, &whole),
                                "the frame depends on how the bytes arrived"
                            )
                        }
                        Ok(None) => panic!("a frame found in a prefix is incomplete in the whole stream"),
                        Err(_) => panic!("a frame found in a prefix is an error in the whole stream"),
                    }
                    let frame = &stream[consumed..consumed + len];
                    consumed += len;
                    if !each(frame, v) {
                        return;
                    }
                }
                Ok(None) => {
                    assert!(
                        buf.len() <= bound,
                        "{} bytes buffered waiting for a frame (bound {bound})",
                        buf.len()
                    );
                    break;
                }
                Err(_) => {
                    assert!(
                        framer(&stream[consumed..]).is_err(),
                        "an error in a prefix is not one in the whole stream"
                    );
                    return;
                }
            }
        }
    }
}

/// What the proxy makes of an XOAUTH2/OAUTHBEARER failure challenge: a
/// sentence for the client and the log. It must be non-empty, equal its
/// `Display`, and carry no control character at all (no line break to
/// inject into a reply or a log line), whatever the server sent.
pub fn check_challenge(c: &mailproxy::sasl::OAuthChallenge) {
    let e = c.explain();
    assert!(!e.is_empty());
    assert_eq!(e, c.to_string());
    assert!(!e.chars().any(char::is_control), "control character in {e:?}");
}
