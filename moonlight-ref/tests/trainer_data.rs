//! moonlight-ref's data: llm.c .bin shards (good and corrupt), text files, the split, errors.

use std::path::{Path, PathBuf};

use moonlight_ref::data::{
    encode_bin, load_tokens, parse_bin, BatchSampler, DataFormat, DataSource, Dataset, BIN_MAGIC,
};

/// A fresh directory under the system temp dir for one test.
fn scratch(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("muon-trainer-data-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn file_source(path: &Path) -> DataSource {
    DataSource::File {
        path: path.to_path_buf(),
        format: None,
    }
}

fn load_err(path: &Path) -> String {
    load_tokens(&file_source(path)).unwrap_err().to_string()
}

#[test]
fn bin_shard_round_trips_and_is_detected_by_extension() {
    let dir = scratch("bin-good");
    let tokens: Vec<u16> = (0..5000u32).map(|i| (i * 7919 % 50257) as u16).collect();
    let path = dir.join("shard.bin");
    std::fs::write(&path, encode_bin(&tokens)).unwrap();
    let (name, loaded) = load_tokens(&file_source(&path)).unwrap();
    assert_eq!(loaded, tokens);
    assert!(name.contains("shard.bin"));
    // The same bytes read as text are bytes, not u16 tokens.
    let as_text = DataSource::File {
        path: path.clone(),
        format: Some(DataFormat::Text),
    };
    assert_eq!(load_tokens(&as_text).unwrap().1.len(), 1024 + 2 * tokens.len());
}

#[test]
fn corrupt_bin_headers_are_rejected_with_the_file_and_the_problem() {
    let dir = scratch("bin-bad");
    let good = encode_bin(&[1, 2, 3, 4]);
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("short.bin", good[..1000].to_vec(), "truncated .bin header"),
        (
            "magic.bin",
            {
                let mut b = good.clone();
                b[..4].copy_from_slice(&(BIN_MAGIC + 1).to_le_bytes());
                b
            },
            "bad magic number 20240521",
        ),
        (
            "version.bin",
            {
                let mut b = good.clone();
                b[4..8].copy_from_slice(&2i32.to_le_bytes());
                b
            },
            "unsupported .bin version 2",
        ),
        (
            "count.bin",
            {
                let mut b = good.clone();
                b[8..12].copy_from_slice(&(-5i32).to_le_bytes());
                b
            },
            "declares -5 tokens",
        ),
        ("body.bin", good[..good.len() - 1].to_vec(), "truncated .bin file"),
        (
            "extra.bin",
            {
                let mut b = good.clone();
                b.extend_from_slice(&[9, 9]);
                b
            },
            "2 bytes follow the 4 tokens",
        ),
    ];
    for (name, bytes, problem) in cases {
        let path = dir.join(name);
        std::fs::write(&path, &bytes).unwrap();
        let err = load_err(&path);
        assert!(err.contains(name), "{name}: error does not name the file: {err}");
        assert!(err.contains(problem), "{name}: expected `{problem}` in: {err}");
        // The parser alone says the same.
        assert_eq!(parse_bin(&path, &bytes).unwrap_err().to_string(), err);
    }
}

#[test]
fn tokens_beyond_the_vocab_are_rejected() {
    let err = Dataset::new(
        "shard.bin".into(),
        vec![5; 300].into_iter().chain([300, 7]).collect(),
        16,
        256,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("token 300 at position 300"), "{err}");
    assert!(err.contains("vocab size 256"), "{err}");
}

#[test]
fn missing_empty_and_short_files_are_errors() {
    let dir = scratch("files");
    let missing = dir.join("nope.txt");
    let err = load_err(&missing);
    assert!(
        err.contains("cannot read data file") && err.contains("nope.txt"),
        "{err}"
    );

    let empty = dir.join("empty.txt");
    std::fs::write(&empty, b"").unwrap();
    let err = load_err(&empty);
    assert!(err.contains("empty.txt is empty"), "{err}");

    let short = dir.join("short.txt");
    std::fs::write(&short, b"hello, world: too short for a context").unwrap();
    let err = Dataset::load(&file_source(&short), 64, 256)
        .unwrap_err()
        .to_string();
    assert!(err.contains("short.txt") && err.contains("too short"), "{err}");
    // Two contexts fit: one to train on, one held out.
    assert!(Dataset::load(&file_source(&short), 15, 256).is_ok());
}

#[test]
fn text_file_splits_nine_to_one_and_samples_inside_its_part() {
    let dir = scratch("split");
    let path = dir.join("data.txt");
    let text: Vec<u8> = (0..10_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    std::fs::write(&path, &text).unwrap();
    let data = Dataset::load(&file_source(&path), 32, 256).unwrap();
    assert_eq!(data.train.len(), 9_000);
    assert_eq!(data.val.len(), 1_000);
    assert_eq!(data.val[0], (b'a' + (9_000 % 26) as u8) as u16);

    let mut sampler = BatchSampler::new(3, 4, 32);
    let (mut x, mut y) = (vec![0u32; 128], vec![0u32; 128]);
    for _ in 0..50 {
        sampler.next_batch(&data.val, &mut x, &mut y);
        for (a, b) in x.iter().zip(&y) {
            // The alphabet cycles: each target is the next letter.
            assert_eq!(*b, if *a == b'z' as u32 { b'a' as u32 } else { a + 1 });
        }
    }
}

#[test]
fn embedded_corpus_loads_with_byte_vocab() {
    let data = Dataset::load(&DataSource::Embedded, 64, 256).unwrap();
    assert!(data.train.len() > 300_000);
    assert_eq!(
        data.train.len() + data.val.len(),
        moonlight_ref::corpus::EMBEDDED_BYTES
    );
    // Deterministic: the same fingerprint each time.
    assert_eq!(
        data.fingerprint,
        Dataset::load(&DataSource::Embedded, 64, 256).unwrap().fingerprint
    );
}
