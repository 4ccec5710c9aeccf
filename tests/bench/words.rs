//! The text of the benchmark's messages: common English words and the
//! vocabulary of office mail (with a version number and abbreviations, so
//! some words carry dots), drawn by a deterministic generator so every run
//! sends and stores the same bytes.

/// The words the benchmark's messages are made of.
const WORDS: &[&str] = &[
    "the",
    "of",
    "and",
    "to",
    "in",
    "a",
    "is",
    "that",
    "for",
    "it",
    "as",
    "was",
    "with",
    "be",
    "by",
    "on",
    "not",
    "he",
    "this",
    "are",
    "or",
    "his",
    "from",
    "at",
    "which",
    "but",
    "have",
    "an",
    "had",
    "they",
    "you",
    "were",
    "their",
    "one",
    "all",
    "we",
    "can",
    "her",
    "has",
    "there",
    "been",
    "if",
    "more",
    "when",
    "will",
    "would",
    "who",
    "so",
    "no",
    "meeting",
    "quarterly",
    "report",
    "attached",
    "please",
    "review",
    "thanks",
    "regards",
    "schedule",
    "project",
    "deadline",
    "invoice",
    "customer",
    "server",
    "release",
    "update",
    "proposal",
    "budget",
    "Monday",
    "Tuesday",
    "Wednesday",
    "afternoon",
    "discussion",
    "agenda",
    "minutes",
    "follow-up",
    "question",
    "answer",
    "documentation",
    "configuration",
    "mailbox",
    "message",
    "colleague",
    "v2.3.19",
    "e.g.",
    "i.e.",
];

/// A deterministic xorshift64 generator started at `seed` (not zero).
pub fn xorshift(mut seed: u64) -> impl FnMut() -> u64 {
    move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    }
}

/// The word `r` picks.
pub fn word(r: u64) -> &'static str {
    WORDS[(r % WORDS.len() as u64) as usize]
}
