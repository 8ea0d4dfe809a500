//! The embedded corpus: training text generated in code, deterministically, so the default
//! run needs no download, and longer streams of the same text for runs that must not repeat
//! their data.

use crate::rng::Rng;

/// Size of the embedded corpus in bytes.
pub const EMBEDDED_BYTES: usize = 400_000;

/// The embedded corpus: about 400 KB of English-like text with structure a small model can
/// learn, generated from a fixed seed (the same bytes on every machine and every run).
///
/// It mixes four kinds of line:
/// - sentences from a small probabilistic grammar: noun phrases with optional adjectives,
///   transitive and intransitive verbs that agree in number with their subject (`the fox
///   sees`, `the foxes see`, irregular plurals like `mice`), prepositional phrases, adverbs,
///   and clauses joined by `and`, `but`, `because`, `when`, or reported (`Ada said that ...`);
/// - arithmetic facts: `17 + 25 = 42`, `31 - 9 = 22`, `7 * 8 = 56` (operands below 50, or 13
///   for products), so the digits after `=` are predictable from those before;
/// - a fixed table of 24 invented facts (`The capital of Vardia is Olmen.`) that recur, so
///   they can be memorized;
/// - counting runs (`count: 14 15 16 17 18`) and spelled-out numbers (`three plus four is
///   seven.`).
pub fn embedded_corpus() -> Vec<u8> {
    generated_corpus(EMBEDDED_BYTES)
}

/// `bytes` bytes of the embedded corpus's text: the same generator and seed, run for longer.
/// The embedded corpus is its first [`EMBEDDED_BYTES`]; a larger one continues it with fresh
/// sentences and arithmetic (the fact table repeats by design), for runs that must not see
/// the same text twice (`moonlight-ref corpus --bytes N`).
pub fn generated_corpus(bytes: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes);
    write_corpus(bytes, &mut out).expect("writing into memory cannot fail");
    out
}

/// Streams [`generated_corpus`]`(bytes)` into `out` in pieces of about 64 KiB, so a corpus of
/// any size needs no more memory than that.
pub fn write_corpus(bytes: usize, out: &mut impl std::io::Write) -> std::io::Result<()> {
    const PIECE: usize = 1 << 16;
    let mut rng = Rng::new(0x6d6f_6f6e_6c69_6768); // "moonligh"
    let mut text = String::with_capacity(PIECE + 512);
    let mut left = bytes;
    while left > 0 {
        match rng.below(20) {
            0..=11 => grammar::paragraph(&mut rng, &mut text),
            12..=15 => grammar::arithmetic(&mut rng, &mut text),
            16..=17 => grammar::fact(&mut rng, &mut text),
            18 => grammar::counting(&mut rng, &mut text),
            _ => grammar::spelled_sum(&mut rng, &mut text),
        }
        if text.len() >= PIECE.min(left) {
            let n = text.len().min(left);
            out.write_all(&text.as_bytes()[..n])?;
            left -= n;
            text.clear();
        }
    }
    Ok(())
}

mod grammar {
    //! The probabilistic grammar behind [`super::embedded_corpus`].

    use crate::rng::Rng;
    use std::fmt::Write;

    /// (singular, plural)
    const NOUNS: &[(&str, &str)] = &[
        ("cat", "cats"),
        ("dog", "dogs"),
        ("fox", "foxes"),
        ("bird", "birds"),
        ("child", "children"),
        ("mouse", "mice"),
        ("farmer", "farmers"),
        ("teacher", "teachers"),
        ("robot", "robots"),
        ("sailor", "sailors"),
        ("baker", "bakers"),
        ("horse", "horses"),
        ("wolf", "wolves"),
        ("student", "students"),
        ("king", "kings"),
        ("girl", "girls"),
        ("boy", "boys"),
        ("owl", "owls"),
    ];
    const THINGS: &[(&str, &str)] = &[
        ("ball", "balls"),
        ("book", "books"),
        ("box", "boxes"),
        ("apple", "apples"),
        ("stone", "stones"),
        ("letter", "letters"),
        ("lamp", "lamps"),
        ("key", "keys"),
        ("boat", "boats"),
        ("map", "maps"),
        ("cake", "cakes"),
        ("song", "songs"),
    ];
    const ADJECTIVES: &[&str] = &[
        "small", "big", "red", "green", "old", "young", "quiet", "happy", "clever", "tired", "bright",
        "dark", "brave", "lazy", "strange", "gentle",
    ];
    /// (third person singular present, plural present, past)
    const TRANSITIVE: &[(&str, &str, &str)] = &[
        ("sees", "see", "saw"),
        ("likes", "like", "liked"),
        ("finds", "find", "found"),
        ("carries", "carry", "carried"),
        ("watches", "watch", "watched"),
        ("follows", "follow", "followed"),
        ("builds", "build", "built"),
        ("wants", "want", "wanted"),
        ("holds", "hold", "held"),
        ("brings", "bring", "brought"),
    ];
    const INTRANSITIVE: &[(&str, &str, &str)] = &[
        ("sleeps", "sleep", "slept"),
        ("runs", "run", "ran"),
        ("sings", "sing", "sang"),
        ("waits", "wait", "waited"),
        ("laughs", "laugh", "laughed"),
        ("swims", "swim", "swam"),
        ("works", "work", "worked"),
    ];
    const PLACES: &[&str] = &[
        "in the garden",
        "near the river",
        "under the old bridge",
        "on the hill",
        "at the market",
        "in the forest",
        "by the sea",
        "behind the house",
        "inside the castle",
    ];
    const ADVERBS: &[&str] = &[
        "quietly",
        "slowly",
        "quickly",
        "every morning",
        "at night",
        "again",
        "today",
        "yesterday",
    ];
    const NAMES: &[&str] = &["Ada", "Ben", "Cleo", "Dmitri", "Ema", "Farid", "Grace", "Hugo"];
    const CONNECTIVES: &[&str] = &["and", "but", "because", "so", "while"];
    /// The invented facts: (country, capital, river).
    const COUNTRIES: &[(&str, &str, &str)] = &[
        ("Vardia", "Olmen", "Sask"),
        ("Quellon", "Brist", "Amar"),
        ("Tazir", "Kovo", "Lune"),
        ("Morrow", "Pexa", "Tilde"),
        ("Estany", "Ruun", "Valo"),
        ("Gorhal", "Yense", "Orrin"),
        ("Pirenth", "Caldo", "Memm"),
        ("Zubrica", "Hallow", "Sif"),
    ];
    const NUMBER_WORDS: &[&str] = &[
        "zero",
        "one",
        "two",
        "three",
        "four",
        "five",
        "six",
        "seven",
        "eight",
        "nine",
        "ten",
        "eleven",
        "twelve",
        "thirteen",
        "fourteen",
        "fifteen",
        "sixteen",
        "seventeen",
        "eighteen",
    ];

    /// A uniformly chosen word.
    fn word(rng: &mut Rng, words: &[&'static str]) -> &'static str {
        words[rng.below(words.len())]
    }

    /// A noun phrase; returns whether it is plural.
    fn noun_phrase(rng: &mut Rng, nouns: &[(&str, &str)], out: &mut String) -> bool {
        let plural = rng.chance(0.35);
        let (sing, plur) = *rng.pick(nouns);
        out.push_str(if plural {
            word(rng, &["the", "some", "two", "many"])
        } else {
            word(rng, &["the", "a", "one", "every"])
        });
        if rng.chance(0.5) {
            out.push(' ');
            out.push_str(word(rng, ADJECTIVES));
        }
        out.push(' ');
        out.push_str(if plural { plur } else { sing });
        plural
    }

    /// A clause: subject, verb agreeing with it, object or place, adverb.
    fn clause(rng: &mut Rng, past: bool, out: &mut String) {
        let plural = if rng.chance(0.15) {
            out.push_str(word(rng, NAMES));
            false
        } else {
            noun_phrase(rng, NOUNS, out)
        };
        out.push(' ');
        let verb_form = |v: &(&'static str, &'static str, &'static str)| match (past, plural) {
            (true, _) => v.2,
            (false, false) => v.0,
            (false, true) => v.1,
        };
        if rng.chance(0.6) {
            out.push_str(verb_form(rng.pick(TRANSITIVE)));
            out.push(' ');
            let objects = if rng.chance(0.7) { THINGS } else { NOUNS };
            noun_phrase(rng, objects, out);
        } else {
            out.push_str(verb_form(rng.pick(INTRANSITIVE)));
        }
        if rng.chance(0.4) {
            out.push(' ');
            out.push_str(word(rng, PLACES));
        }
        if rng.chance(0.25) {
            out.push(' ');
            out.push_str(word(rng, ADVERBS));
        }
    }

    fn sentence(rng: &mut Rng, out: &mut String) {
        let start = out.len();
        let past = rng.chance(0.4);
        match rng.below(6) {
            0 => {
                out.push_str(word(rng, NAMES));
                out.push_str(" said that ");
                clause(rng, past, out);
            }
            1 => {
                out.push_str("when ");
                clause(rng, past, out);
                out.push_str(", ");
                clause(rng, past, out);
            }
            2 | 3 => {
                clause(rng, past, out);
                out.push(' ');
                out.push_str(word(rng, CONNECTIVES));
                out.push(' ');
                clause(rng, past, out);
            }
            _ => clause(rng, past, out),
        }
        out.push('.');
        // Capitalize the first letter.
        let first = out[start..].chars().next().map(|c| c.to_ascii_uppercase());
        if let Some(c) = first {
            out.replace_range(start..start + 1, c.encode_utf8(&mut [0; 4]));
        }
    }

    /// Two to five sentences on one line.
    pub fn paragraph(rng: &mut Rng, out: &mut String) {
        let n = 2 + rng.below(4);
        for i in 0..n {
            if i > 0 {
                out.push(' ');
            }
            sentence(rng, out);
        }
        out.push('\n');
    }

    /// One arithmetic fact with a correct answer.
    pub fn arithmetic(rng: &mut Rng, out: &mut String) {
        let _ = match rng.below(3) {
            0 => {
                let (a, b) = (rng.below(50), rng.below(50));
                writeln!(out, "{a} + {b} = {}", a + b)
            }
            1 => {
                let (a, b) = (rng.below(50), rng.below(50));
                let (a, b) = (a.max(b), a.min(b));
                writeln!(out, "{a} - {b} = {}", a - b)
            }
            _ => {
                let (a, b) = (rng.below(13), rng.below(13));
                writeln!(out, "{a} * {b} = {}", a * b)
            }
        };
    }

    /// One fact from the fixed table.
    pub fn fact(rng: &mut Rng, out: &mut String) {
        let (country, capital, river) = *rng.pick(COUNTRIES);
        let _ = match rng.below(3) {
            0 => writeln!(out, "The capital of {country} is {capital}."),
            1 => writeln!(out, "The river {river} flows through {country}."),
            _ => writeln!(out, "{capital} is a city in {country}, on the river {river}."),
        };
    }

    /// A run of consecutive numbers.
    pub fn counting(rng: &mut Rng, out: &mut String) {
        let start = rng.below(90);
        let len = 4 + rng.below(6);
        out.push_str("count:");
        for n in start..start + len {
            let _ = write!(out, " {n}");
        }
        out.push('\n');
    }

    /// A small sum in words.
    pub fn spelled_sum(rng: &mut Rng, out: &mut String) {
        let a = rng.below(10);
        let b = rng.below(NUMBER_WORDS.len() - a);
        let _ = writeln!(
            out,
            "{} plus {} is {}.",
            NUMBER_WORDS[a],
            NUMBER_WORDS[b],
            NUMBER_WORDS[a + b]
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_is_the_same_bytes_as_ever() {
        // CRC-32s of the corpus as first generated (whole, before it was streamed in pieces):
        // the embedded corpus is data, and checkpoints hold its fingerprint, so its bytes must
        // not change. The sizes straddle the 64 KiB piece.
        for (bytes, crc) in [
            (EMBEDDED_BYTES, 0xad9c_9adc),
            (1_234_567, 0x5a2e_b99f),
            (65_536, 0x5906_1b56),
            (65_537, 0x6d8b_8880),
            (10, 0xdd2c_80cb),
        ] {
            assert_eq!(crc32fast::hash(&generated_corpus(bytes)), crc, "{bytes} bytes");
        }
    }

    #[test]
    fn embedded_corpus_is_deterministic_text() {
        let a = embedded_corpus();
        assert_eq!(a.len(), EMBEDDED_BYTES);
        assert_eq!(a, embedded_corpus());
        let text = std::str::from_utf8(&a).unwrap();
        assert!(text.contains(" = "));
        assert!(text.contains("The capital of "));
        assert!(text.lines().count() > 1000);
    }

    #[test]
    fn a_larger_generated_corpus_continues_the_embedded_one() {
        let big = generated_corpus(3 * EMBEDDED_BYTES);
        assert_eq!(big.len(), 3 * EMBEDDED_BYTES);
        assert_eq!(&big[..EMBEDDED_BYTES], &embedded_corpus()[..]);
        // Fresh text after the prefix: its sentences are not the prefix's over again.
        let (head, tail) = big.split_at(EMBEDDED_BYTES);
        assert!(std::str::from_utf8(tail).is_ok());
        assert_ne!(&tail[..EMBEDDED_BYTES], head);
    }

    #[test]
    fn arithmetic_lines_are_correct() {
        let corpus = String::from_utf8(embedded_corpus()).unwrap();
        let mut checked = 0;
        for line in corpus.lines() {
            let parts: Vec<&str> = line.split(' ').collect();
            if parts.len() == 5 && parts[3] == "=" {
                let (a, b, c): (i64, i64, i64) = (
                    parts[0].parse().unwrap(),
                    parts[2].parse().unwrap(),
                    parts[4].parse().unwrap(),
                );
                let expect = match parts[1] {
                    "+" => a + b,
                    "-" => a - b,
                    "*" => a * b,
                    op => panic!("operator {op}"),
                };
                assert_eq!(c, expect, "{line}");
                checked += 1;
            }
        }
        assert!(checked > 500, "{checked} arithmetic lines");
    }
}
