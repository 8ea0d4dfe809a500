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
    assert!(!moonlight_ref::files::temp_path(&path).exists());
    let first = std::fs::read(&path).unwrap();

    // Block the temporary file's name: the save must fail before touching the checkpoint.
    std::fs::create_dir(moonlight_ref::files::temp_path(&path)).unwrap();
    let err = checkpoint::save(&path, &sample(2.0)).unwrap_err().to_string();
    assert!(err.contains("cannot write checkpoint"), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), first);
    std::fs::remove_dir(moonlight_ref::files::temp_path(&path)).unwrap();

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

/// The byte range of tensor `name`'s data inside a safetensors file.
fn tensor_bytes(file: &[u8], name: &str) -> std::ops::Range<usize> {
    let header = u64::from_le_bytes(file[..8].try_into().unwrap()) as usize;
    let (_, meta) = safetensors::SafeTensors::read_metadata(file).unwrap();
    let info = meta.info(name).unwrap_or_else(|| panic!("no tensor {name}"));
    8 + header + info.data_offsets.0..8 + header + info.data_offsets.1
}

#[test]
fn a_flipped_bit_or_an_edited_field_is_refused_by_name() {
    let dir = scratch("integrity");
    let mut ckpt = sample(0.25);
    ckpt.metadata.insert("sampler_state".into(), "12345".into());
    let good = checkpoint::to_safetensors(&ckpt).unwrap();
    let path = dir.join("c.safetensors");
    // One bit of one value, in a weight, a momentum buffer, an AdamW moment and a router bias.
    for (tensor, bit) in [
        ("param.layers.0.attn.wq", 0),
        ("optim.layers.1.moe.experts.w_up.momentum", 13),
        ("optim.layers.0.attn_norm.v", 31),
        ("buffer.layers.1.moe.router_bias", 7),
    ] {
        let mut bytes = good.clone();
        let at = tensor_bytes(&bytes, tensor).start + 4; // the second value
        bytes[at + bit / 8] ^= 1 << (bit % 8);
        std::fs::write(&path, &bytes).unwrap();
        let err = checkpoint::load(&path).unwrap_err().to_string();
        assert!(
            err.contains(&format!("tensor `{tensor}` fails its checksum")),
            "{tensor}: {err}"
        );
    }
    // Edited metadata, the same length so the file still parses.
    for (from, to) in [("\"7\"", "\"8\""), ("12345", "12346")] {
        std::fs::write(&path, patch(&good, from, to)).unwrap();
        let err = checkpoint::load(&path).unwrap_err().to_string();
        assert!(err.contains("its metadata fails its checksum"), "{from}: {err}");
    }
    std::fs::write(&path, &good).unwrap();
    assert_eq!(checkpoint::load(&path).unwrap().params, ckpt.params);
}

#[test]
fn nothing_non_finite_is_saved_or_loaded() {
    let dir = scratch("finite");
    for (bad, what) in [
        (f32::NAN, "NaN"),
        (f32::INFINITY, "inf"),
        (f32::NEG_INFINITY, "-inf"),
    ] {
        let mut ckpt = sample(1.5);
        ckpt.optimizer.params[0].buffers[0][5] = bad;
        let err = checkpoint::save(&dir.join("c.safetensors"), &ckpt)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("tensor `optim.layers.0.attn.wq.momentum` is not finite")
                && err.contains(&format!("{what} at element 5")),
            "{err}"
        );
        assert!(!dir.join("c.safetensors").exists());
    }
    // A file without checksums (the earlier format) holding a NaN is read, checked, refused.
    let ckpt = sample(1.5);
    let mut bytes = checkpoint::to_safetensors(&ckpt).unwrap();
    let at = tensor_bytes(&bytes, "param.layers.0.attn_norm").start + 8;
    bytes[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let mut old: std::collections::HashMap<String, String> = meta.metadata().clone().unwrap();
    old.insert("format".into(), checkpoint::FORMAT_WITHOUT_CHECKSUMS.into());
    old.remove("checksums");
    old.remove("metadata_checksum");
    let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let rewrite = |tensors: &safetensors::SafeTensors, metadata| {
        let views: Vec<(String, safetensors::tensor::TensorView)> = tensors.tensors();
        safetensors::serialize(views, Some(metadata)).unwrap()
    };
    let path = dir.join("old.safetensors");
    std::fs::write(&path, rewrite(&tensors, old.clone())).unwrap();
    let err = checkpoint::load(&path).unwrap_err().to_string();
    assert!(
        err.contains("tensor `param.layers.0.attn_norm` is not finite (NaN at element 2)"),
        "{err}"
    );
    // ...and one without a NaN still loads: older checkpoints keep working.
    let good = checkpoint::to_safetensors(&ckpt).unwrap();
    let tensors = safetensors::SafeTensors::deserialize(&good).unwrap();
    std::fs::write(&path, rewrite(&tensors, old)).unwrap();
    assert_eq!(checkpoint::load(&path).unwrap().params, ckpt.params);
}
