//! moonlight-ref's checkpoint file: round trip, atomic writes, corrupt files.

use std::collections::BTreeMap;
use std::path::PathBuf;

use moonlight_ref::checkpoint::{self, Checkpoint, Tensor};
use muon_core::{OptimizerKind, OptimizerState, ParamState, Shape};

fn scratch(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("muon-trainer-ckpt-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn values(n: usize, salt: f32) -> Vec<f32> {
    (0..n).map(|i| (i as f32 * 0.37 + salt).sin()).collect()
}

/// A checkpoint with a matrix (Muon), an expert stack (Muon) and a norm gain (AdamW).
fn sample(salt: f32) -> Checkpoint {
    let shapes = [
        ("layers.0.attn.wq", Shape::matrix(8, 4)),
        ("layers.1.moe.experts.w_up", Shape::batched(3, 4, 6)),
        ("layers.0.attn_norm", Shape::vector(4)),
    ];
    let params: Vec<Tensor> = shapes
        .iter()
        .map(|(name, shape)| Tensor {
            name: name.to_string(),
            shape: *shape,
            data: values(shape.len(), salt),
        })
        .collect();
    let optimizer = OptimizerState {
        step: 7,
        params: shapes
            .iter()
            .enumerate()
            .map(|(i, (name, shape))| {
                let (kind, n) = if i < 2 {
                    (OptimizerKind::Muon, 1)
                } else {
                    (OptimizerKind::AdamW, 2)
                };
                ParamState {
                    name: name.to_string(),
                    shape: *shape,
                    kind,
                    buffers: (0..n)
                        .map(|b| values(shape.len(), salt + 10.0 * (b + 1) as f32))
                        .collect(),
                }
            })
            .collect(),
    };
    let mut metadata = BTreeMap::new();
    metadata.insert("step".to_string(), "7".to_string());
    Checkpoint {
        metadata,
        params,
        buffers: vec![Tensor {
            name: "layers.1.moe.router_bias".into(),
            shape: Shape::vector(3),
            data: vec![0.1, -0.2, 0.3],
        }],
        optimizer,
    }
}

#[test]
fn round_trip_keeps_every_tensor_bit_for_bit() {
    let dir = scratch("round-trip");
    let path = dir.join("c.safetensors");
    let ckpt = sample(0.5);
    checkpoint::save(&path, &ckpt).unwrap();
    let back = checkpoint::load(&path).unwrap();
    assert_eq!(back.params, ckpt.params);
    assert_eq!(back.buffers, ckpt.buffers);
    assert_eq!(back.optimizer, ckpt.optimizer);
    assert_eq!(back.metadata["step"], "7");
    assert_eq!(back.metadata["format"], checkpoint::FORMAT);
}

#[test]
fn a_failed_write_leaves_the_old_checkpoint_and_a_good_one_leaves_no_temp_file() {
    let dir = scratch("atomic");
    let path = dir.join("c.safetensors");
    checkpoint::save(&path, &sample(1.0)).unwrap();
    assert!(!checkpoint::temp_path(&path).exists());
    let first = std::fs::read(&path).unwrap();

    // Block the temporary file's name: the save must fail before touching the checkpoint.
    std::fs::create_dir(checkpoint::temp_path(&path)).unwrap();
    let err = checkpoint::save(&path, &sample(2.0)).unwrap_err().to_string();
    assert!(err.contains("cannot write checkpoint"), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), first);
    std::fs::remove_dir(checkpoint::temp_path(&path)).unwrap();

    checkpoint::save(&path, &sample(2.0)).unwrap();
    assert_eq!(checkpoint::load(&path).unwrap(), {
        let mut c = sample(2.0);
        c.metadata = checkpoint::load(&path).unwrap().metadata;
        c
    });
    let names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 1, "left behind: {names:?}");
}

/// Replaces the first occurrence of `from` with `to` (same length) in the file's bytes.
fn patch(bytes: &[u8], from: &str, to: &str) -> Vec<u8> {
    assert_eq!(from.len(), to.len());
    let at = bytes
        .windows(from.len())
        .position(|w| w == from.as_bytes())
        .expect("pattern in header");
    let mut out = bytes.to_vec();
    out[at..at + to.len()].copy_from_slice(to.as_bytes());
    out
}

#[test]
fn corrupt_checkpoints_are_clear_errors() {
    let dir = scratch("corrupt");
    let good = checkpoint::to_safetensors(&sample(0.0)).unwrap();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "truncated",
            good[..good.len() - 10].to_vec(),
            "corrupt checkpoint",
        ),
        (
            "garbage",
            b"definitely not a safetensors file".to_vec(),
            "corrupt checkpoint",
        ),
        (
            "renamed",
            patch(&good, "param.layers.0.attn.wq", "param.layers.0.attn.wz"),
            "tensor `param.layers.0.attn.wq` is missing",
        ),
        (
            "optimizer",
            patch(&good, "optim.layers.0.attn_norm.v", "optim.layers.0.attn_norm.w"),
            "tensor `optim.layers.0.attn_norm.v` is missing",
        ),
        (
            "format",
            patch(&good, checkpoint::FORMAT, "moonlight-ref-checkpoint/9"),
            "format `moonlight-ref-checkpoint/9`",
        ),
    ];
    for (name, bytes, problem) in cases {
        let path = dir.join(format!("{name}.safetensors"));
        std::fs::write(&path, &bytes).unwrap();
        let err = checkpoint::load(&path).unwrap_err().to_string();
        assert!(
            err.contains(&path.display().to_string()),
            "{name}: file not named: {err}"
        );
        assert!(err.contains(problem), "{name}: expected `{problem}` in: {err}");
    }
    let err = checkpoint::load(&dir.join("absent.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("cannot read checkpoint"), "{err}");
}
