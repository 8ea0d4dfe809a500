//! A real tokenizer end to end: `tokenizer` trains a byte-level BPE that round-trips text,
//! `train`, `eval` and `sample` take it with `--tokenizer`, and a tokenizer whose ids do not
//! fit the model is refused.

use std::path::Path;
use std::process::{Command, Output};

use moonlight_ref::tokenizer::Tokenizer;

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_moonlight-ref"))
        .args(args)
        .output()
        .expect("the binary runs")
}

fn ok(args: &[&str]) -> Vec<u8> {
    let out = run(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn fails(args: &[&str]) -> String {
    let out = run(args);
    assert!(!out.status.success(), "{args:?} should fail");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(err.starts_with("error: ") && !err.contains("panicked"), "{err}");
    err
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[test]
fn a_trained_bpe_tokenizer_works_for_train_eval_and_sample() {
    let dir = std::env::temp_dir().join(format!("moonlight-tok-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut text = String::from_utf8(moonlight_ref::corpus::embedded_corpus()).unwrap();
    text.truncate(text.floor_char_boundary(20_000));
    text.push_str(" naïve café — ünïcode ✓\n");
    let data = dir.join("text.txt");
    std::fs::write(&data, &text).unwrap();
    let tok_file = dir.join("tokenizer.json");
    ok(&[
        "tokenizer",
        "--data",
        p(&data),
        "--vocab",
        "320",
        "--out",
        p(&tok_file),
    ]);
    let tok = Tokenizer::load(&tok_file).unwrap();
    assert!(
        tok.vocab_size() > 256 && tok.vocab_size() <= 320,
        "{}",
        tok.vocab_size()
    );
    let ids = tok.encode(&text).unwrap();
    assert!(
        ids.len() < text.len() * 3 / 4,
        "merges should shorten the text: {} ids for {} bytes",
        ids.len(),
        text.len()
    );
    assert_eq!(
        tok.decode(&ids).unwrap(),
        text,
        "byte-level BPE round-trips any text"
    );

    let run_dir = dir.join("run");
    ok(&[
        "train",
        "--steps",
        "4",
        "--warmup",
        "1",
        "--batch",
        "2",
        "--seq",
        "32",
        "--data",
        p(&data),
        "--tokenizer",
        p(&tok_file),
        "--out",
        p(&run_dir),
        "--quiet",
        "--threads",
        "1",
    ]);
    let ck = run_dir.join("checkpoint.safetensors");
    let line = ok(&[
        "eval",
        "--checkpoint",
        p(&ck),
        "--data",
        p(&data),
        "--tokenizer",
        p(&tok_file),
        "--quiet",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
    assert_eq!(v["tokens"], (ids.len() - 1) as u64);
    let (loss, bpb) = (v["loss"].as_f64().unwrap(), v["bits_per_byte"].as_f64().unwrap());
    // Fewer tokens than bytes: each token's nats spread over more than one byte.
    assert!(bpb < loss / std::f64::consts::LN_2, "bpb {bpb}, loss {loss}");
    let sample = |seed| {
        ok(&[
            "sample",
            "--checkpoint",
            p(&ck),
            "--tokenizer",
            p(&tok_file),
            "--prompt",
            "The ",
            "--tokens",
            "40",
            "--seed",
            seed,
        ])
    };
    let a = sample("5");
    assert_eq!(a, sample("5"));
    assert!(String::from_utf8(a).unwrap().starts_with("The "));
    // Without the tokenizer, this model's vocabulary is not bytes.
    let err = fails(&["sample", "--checkpoint", p(&ck)]);
    assert!(err.contains("not the 256 bytes"), "{err}");

    // A byte-level model cannot take a 320-token tokenizer.
    let bytes_run = dir.join("bytes");
    ok(&[
        "train",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--batch",
        "1",
        "--seq",
        "16",
        "--data",
        p(&data),
        "--out",
        p(&bytes_run),
        "--quiet",
        "--threads",
        "1",
    ]);
    let bytes_ck = bytes_run.join("checkpoint.safetensors");
    let err = fails(&[
        "sample",
        "--checkpoint",
        p(&bytes_ck),
        "--tokenizer",
        p(&tok_file),
    ]);
    assert!(
        err.contains("does not fit") || err.contains("outside the model"),
        "{err}"
    );
    let err = fails(&[
        "eval",
        "--checkpoint",
        p(&bytes_ck),
        "--data",
        p(&data),
        "--tokenizer",
        p(&tok_file),
    ]);
    assert!(err.contains("outside the model"), "{err}");
    let err = fails(&[
        "train",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--vocab",
        "256",
        "--data",
        p(&data),
        "--tokenizer",
        p(&tok_file),
        "--out",
        p(&dir.join("x")),
        "--quiet",
    ]);
    assert!(err.contains("outside the model"), "{err}");
    let err = fails(&[
        "tokenizer",
        "--data",
        p(&data),
        "--vocab",
        "100",
        "--out",
        p(&dir.join("t.json")),
    ]);
    assert!(err.contains("--vocab 100"), "{err}");
    let err = fails(&[
        "eval",
        "--checkpoint",
        p(&ck),
        "--data",
        p(&data),
        "--tokenizer",
        p(&data),
    ]);
    assert!(err.contains("cannot load"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
