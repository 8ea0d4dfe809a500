//! Checkpoints: one safetensors file with every parameter, every optimizer buffer, the model's
//! buffers (router biases) and string metadata, written atomically and checked on load
//! (docs/DESIGN.md §7).
//!
//! Tensor names (all `F32`, shape `[rows, cols]`, or `[batch, rows, cols]` for a stack):
//! - `param.<name>`: a parameter, `<name>` as its `ParamSpec` says (`param.layers.1.attn.wq`);
//! - `optim.<name>.momentum` (Muon), or `optim.<name>.m` and `optim.<name>.v` (AdamW);
//! - `buffer.<name>`: a model buffer.
//!
//! Metadata (the safetensors header's `__metadata__`, strings): `format`, the order of the
//! parameters and buffers (`params`, `buffers`, JSON lists), `optimizer_step`, whatever the
//! trainer adds (the model config, the run settings, the data sampler's state), and two
//! integrity fields: `checksums`, a JSON list of the CRC-32 of every tensor's bytes (in the
//! order parameters, buffers, optimizer state, each as the lists above order them), and
//! `metadata_checksum`, the CRC-32 of all the other metadata. [`load`] verifies both, so a
//! flipped bit in a weight or an edited step is an error, not a silently different run.
//!
//! Nothing non-finite is written or read: [`to_safetensors`] refuses a tensor holding NaN or
//! Inf, and so does [`from_safetensors`], naming the tensor.
//!
//! [`save`] writes a temporary file (a name unique to the process) in the same
//! directory, fsyncs it, and renames it over the target, so a crash leaves either the old
//! checkpoint or the new one, never half of one.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::Path;

use muon_core::{OptimizerKind, OptimizerState, ParamState, Shape};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

use crate::files;
use crate::model::{Model, ModelError};
use crate::ops::ModelOps;

pub use crate::model::Tensor;

/// The `format` metadata value of files this module writes.
pub const FORMAT: &str = "moonlight-ref-checkpoint/2";
/// The format before checksums: still read (its structure and finiteness are checked; it has
/// no checksums to verify).
pub const FORMAT_WITHOUT_CHECKSUMS: &str = "moonlight-ref-checkpoint/1";

/// What is wrong with a checkpoint; the message names the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckpointError(pub String);

impl fmt::Display for CheckpointError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CheckpointError {}

/// Everything a checkpoint holds, on the host.
#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    /// Free-form metadata (the keys `format`, `params`, `buffers`, `optimizer_step`,
    /// `checksums` and `metadata_checksum` are this module's own and are overwritten on save).
    pub metadata: BTreeMap<String, String>,
    /// The parameters, in the model's order.
    pub params: Vec<Tensor>,
    /// The model's buffers.
    pub buffers: Vec<Tensor>,
    /// The optimizer's state (its `params` in the same order as `params`).
    pub optimizer: OptimizerState<f32>,
}

fn dims(shape: Shape) -> Vec<usize> {
    if shape.batch == 1 {
        vec![shape.rows, shape.cols]
    } else {
        vec![shape.batch, shape.rows, shape.cols]
    }
}

/// A tensor as the file names it (`param.embed`), with its shape and data.
type FileTensor<'a> = (String, Shape, &'a [f32]);

/// The file's tensors: parameters, buffers, then the optimizer's buffers.
fn file_tensors(ckpt: &Checkpoint) -> Result<Vec<FileTensor<'_>>, String> {
    let mut out: Vec<FileTensor<'_>> = Vec::new();
    for t in &ckpt.params {
        out.push((format!("param.{}", t.name), t.shape, &t.data));
    }
    for t in &ckpt.buffers {
        out.push((format!("buffer.{}", t.name), t.shape, &t.data));
    }
    for p in &ckpt.optimizer.params {
        let names: &[&str] = match p.kind {
            OptimizerKind::Muon => &["momentum"],
            OptimizerKind::AdamW => &["m", "v"],
        };
        if names.len() != p.buffers.len() {
            return Err(format!("`{}` has {} optimizer buffers", p.name, p.buffers.len()));
        }
        for (suffix, buffer) in names.iter().zip(&p.buffers) {
            out.push((format!("optim.{}.{suffix}", p.name), p.shape, buffer));
        }
    }
    Ok(out)
}

/// Where `data` first holds NaN or Inf, as `"inf at element 12"`.
fn non_finite(data: &[f32]) -> Option<String> {
    let i = data.iter().position(|v| !v.is_finite())?;
    Some(format!("{} at element {i}", data[i]))
}

/// The CRC-32 of every metadata entry but `metadata_checksum` itself, each key and value
/// length-prefixed so that no two different maps hash the same bytes.
fn metadata_checksum(metadata: &BTreeMap<String, String>) -> u32 {
    let mut h = crc32fast::Hasher::new();
    for (k, v) in metadata.iter().filter(|(k, _)| *k != "metadata_checksum") {
        for part in [k.as_bytes(), v.as_bytes()] {
            h.update(&(part.len() as u64).to_le_bytes());
            h.update(part);
        }
    }
    h.finalize()
}

fn hex(crc: u32) -> String {
    format!("{crc:08x}")
}

/// Serializes a checkpoint to safetensors bytes, with its checksums. Refuses a tensor that
/// holds NaN or Inf.
pub fn to_safetensors(ckpt: &Checkpoint) -> Result<Vec<u8>, CheckpointError> {
    let err = |e: &dyn fmt::Display| CheckpointError(format!("cannot serialize the checkpoint: {e}"));
    if ckpt.optimizer.params.len() != ckpt.params.len() {
        return Err(err(&"the optimizer state and the parameters differ in number"));
    }
    if let Some((name, at)) = ckpt.non_finite() {
        return Err(err(&format!("tensor `{name}` is not finite ({at})")));
    }
    let tensors = file_tensors(ckpt).map_err(|e| err(&e))?;
    let mut checksums = Vec::with_capacity(tensors.len());
    let mut views = Vec::with_capacity(tensors.len());
    for (name, shape, data) in &tensors {
        // The views borrow the data as bytes (the crate is little-endian).
        let bytes: &[u8] = bytemuck::cast_slice(data);
        checksums.push(hex(crc32fast::hash(bytes)));
        views.push((
            name.as_str(),
            TensorView::new(Dtype::F32, dims(*shape), bytes).map_err(|e| err(&e))?,
        ));
    }
    let mut metadata = ckpt.metadata.clone();
    let names = |ts: &[Tensor]| serde_json::to_string(&ts.iter().map(|t| &t.name).collect::<Vec<_>>());
    metadata.insert("format".into(), FORMAT.into());
    metadata.insert("params".into(), names(&ckpt.params).map_err(|e| err(&e))?);
    metadata.insert("buffers".into(), names(&ckpt.buffers).map_err(|e| err(&e))?);
    metadata.insert("optimizer_step".into(), ckpt.optimizer.step.to_string());
    metadata.insert(
        "checksums".into(),
        serde_json::to_string(&checksums).map_err(|e| err(&e))?,
    );
    metadata.remove("metadata_checksum");
    let sum = hex(metadata_checksum(&metadata));
    metadata.insert("metadata_checksum".into(), sum);
    let metadata: HashMap<String, String> = metadata.into_iter().collect();
    safetensors::serialize(views, Some(metadata)).map_err(|e| err(&e))
}

/// Parses safetensors bytes written by [`to_safetensors`], verifying the checksums and that
/// every tensor is finite; `path` only names the file in errors.
pub fn from_safetensors(path: &Path, bytes: &[u8]) -> Result<Checkpoint, CheckpointError> {
    let file = path.display();
    let bad = |msg: String| CheckpointError(format!("corrupt checkpoint {file}: {msg}"));
    let tensors = SafeTensors::deserialize(bytes).map_err(|e| bad(format!("{e}")))?;
    let (_, header) = SafeTensors::read_metadata(bytes).map_err(|e| bad(format!("{e}")))?;
    let metadata: BTreeMap<String, String> = header
        .metadata()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    let checked = match metadata.get("format").map(String::as_str) {
        Some(FORMAT) => true,
        Some(FORMAT_WITHOUT_CHECKSUMS) => false,
        Some(f) => return Err(bad(format!("format `{f}`, expected `{FORMAT}`"))),
        None => return Err(bad("no `format` metadata: not a moonlight-ref checkpoint".into())),
    };
    let mut checksums: Option<Vec<String>> = None;
    if checked {
        let stored = metadata
            .get("metadata_checksum")
            .ok_or_else(|| bad("no `metadata_checksum` metadata".into()))?;
        let computed = hex(metadata_checksum(&metadata));
        if *stored != computed {
            return Err(bad(format!(
                "its metadata fails its checksum (stored {stored}, computed {computed}): the file was edited or damaged"
            )));
        }
        let json = metadata
            .get("checksums")
            .ok_or_else(|| bad("no `checksums` metadata".into()))?;
        checksums = Some(serde_json::from_str(json).map_err(|e| bad(format!("`checksums` metadata: {e}")))?);
    }
    let list = |key: &str| -> Result<Vec<String>, CheckpointError> {
        let json = metadata
            .get(key)
            .ok_or_else(|| bad(format!("no `{key}` metadata")))?;
        serde_json::from_str(json).map_err(|e| bad(format!("`{key}` metadata: {e}")))
    };
    let read = |name: &str| -> Result<(Shape, Vec<f32>), CheckpointError> {
        let view = tensors
            .tensor(name)
            .map_err(|_| bad(format!("tensor `{name}` is missing")))?;
        if view.dtype() != Dtype::F32 {
            return Err(bad(format!(
                "tensor `{name}` is {:?}, expected F32",
                view.dtype()
            )));
        }
        let shape = match *view.shape() {
            [rows, cols] => Shape::matrix(rows, cols),
            [batch, rows, cols] => Shape::batched(batch, rows, cols),
            ref other => return Err(bad(format!("tensor `{name}` has {} dimensions", other.len()))),
        };
        // A copy: the bytes of a file are not aligned for f32.
        Ok((shape, bytemuck::pod_collect_to_vec(view.data())))
    };
    let mut params = Vec::new();
    let mut states = Vec::new();
    for name in list("params")? {
        let (shape, data) = read(&format!("param.{name}"))?;
        let momentum = format!("optim.{name}.momentum");
        let (kind, buffers) = if tensors.names().iter().any(|n| **n == momentum) {
            (OptimizerKind::Muon, vec![read(&momentum)?])
        } else {
            let m = read(&format!("optim.{name}.m"))?;
            let v = read(&format!("optim.{name}.v"))?;
            (OptimizerKind::AdamW, vec![m, v])
        };
        if let Some((s, _)) = buffers.iter().find(|(s, _)| *s != shape) {
            return Err(bad(format!(
                "optimizer state of `{name}` has shape {s}, the parameter {shape}"
            )));
        }
        states.push(ParamState {
            name: name.clone(),
            shape,
            kind,
            buffers: buffers.into_iter().map(|(_, d)| d).collect(),
        });
        params.push(Tensor { name, shape, data });
    }
    let mut buffers = Vec::new();
    for name in list("buffers")? {
        let (shape, data) = read(&format!("buffer.{name}"))?;
        buffers.push(Tensor { name, shape, data });
    }
    let step = metadata
        .get("optimizer_step")
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("no valid `optimizer_step` metadata".into()))?;
    let ckpt = Checkpoint {
        metadata,
        params,
        buffers,
        optimizer: OptimizerState { step, params: states },
    };
    // The checksums first: a flipped bit that made a value NaN is damage, and says so.
    let tensors_read = file_tensors(&ckpt).map_err(bad)?;
    if let Some(stored) = &checksums {
        if stored.len() != tensors_read.len() || tensors.len() != tensors_read.len() {
            return Err(bad(format!(
                "it holds {} tensors and {} checksums where its parameters and buffers make {}: tensors were added or removed",
                tensors.len(),
                stored.len(),
                tensors_read.len()
            )));
        }
        for ((name, _, data), stored) in tensors_read.iter().zip(stored) {
            let computed = hex(crc32fast::hash(bytemuck::cast_slice(data)));
            if *stored != computed {
                return Err(bad(format!(
                    "tensor `{name}` fails its checksum (stored {stored}, computed {computed}): the file was changed or damaged"
                )));
            }
        }
    }
    match ckpt.non_finite() {
        Some((name, at)) => Err(bad(format!("tensor `{name}` is not finite ({at})"))),
        None => Ok(ckpt),
    }
}

impl Checkpoint {
    /// The first tensor holding NaN or Inf, if any: its name in the file (`param.embed`) and
    /// where (`NaN at element 3`).
    pub fn non_finite(&self) -> Option<(String, String)> {
        let tensors = file_tensors(self).ok()?;
        tensors
            .into_iter()
            .find_map(|(name, _, data)| non_finite(data).map(|at| (name, at)))
    }

    /// The parameters and buffers of `model`, downloaded from `backend`, with the optimizer's
    /// exported state and the trainer's `metadata`.
    pub fn from_model<B: ModelOps<Elem = f32>>(
        backend: &B,
        model: &Model<B>,
        optimizer: OptimizerState<f32>,
        metadata: BTreeMap<String, String>,
    ) -> Result<Checkpoint, ModelError> {
        let mut params = Vec::with_capacity(model.params().len());
        for (spec, p) in model.param_specs().into_iter().zip(model.params()) {
            let mut data = vec![0.0f32; spec.shape.len()];
            backend.download(p, &mut data)?;
            params.push(Tensor {
                name: spec.name,
                shape: spec.shape,
                data,
            });
        }
        Ok(Checkpoint {
            metadata,
            params,
            buffers: model.buffers(backend)?,
            optimizer,
        })
    }

    /// Uploads the parameters and buffers into `model` after checking that they are the
    /// model's: the same names, order and shapes. The optimizer state is the caller's to
    /// import (`optimizer.import_state(backend, &checkpoint.optimizer)`).
    pub fn restore_model<B: ModelOps<Elem = f32>>(
        &self,
        backend: &B,
        model: &mut Model<B>,
    ) -> Result<(), CheckpointError> {
        let bad = |msg: String| Err(CheckpointError(msg));
        let specs = model.param_specs();
        if self.params.len() != specs.len() {
            return bad(format!(
                "it holds {} parameters, the model has {}",
                self.params.len(),
                specs.len()
            ));
        }
        for (spec, t) in specs.iter().zip(&self.params) {
            if t.name != spec.name {
                return bad(format!(
                    "found parameter `{}` where `{}` belongs",
                    t.name, spec.name
                ));
            }
            if t.shape != spec.shape {
                return bad(format!(
                    "parameter `{}` has shape {}, the model expects {}",
                    t.name, t.shape, spec.shape
                ));
            }
        }
        let backend_error =
            |e: &dyn fmt::Display| CheckpointError(format!("cannot load it into the model: {e}"));
        let expected = model.buffers(backend).map_err(|e| backend_error(&e))?;
        if expected.len() != self.buffers.len() {
            return bad(format!(
                "it holds {} model buffers, the model has {}",
                self.buffers.len(),
                expected.len()
            ));
        }
        for (want, t) in expected.iter().zip(&self.buffers) {
            if want.name != t.name || want.shape != t.shape {
                return bad(format!(
                    "buffer `{}` {} where the model has `{}` {}",
                    t.name, t.shape, want.name, want.shape
                ));
            }
        }
        for (p, t) in model.params_mut().iter_mut().zip(&self.params) {
            backend.upload(p, &t.data).map_err(|e| backend_error(&e))?;
        }
        model
            .load_buffers(backend, &self.buffers)
            .map_err(|e| backend_error(&e))
    }
}

/// Saves a checkpoint atomically.
pub fn save(path: &Path, ckpt: &Checkpoint) -> Result<(), CheckpointError> {
    let bytes = to_safetensors(ckpt)?;
    files::write_atomic(path, &bytes)
        .map_err(|e| CheckpointError(format!("cannot write checkpoint {}: {e}", path.display())))
}

/// Loads a checkpoint, checking its structure (not yet that it fits a model: the trainer does).
pub fn load(path: &Path) -> Result<Checkpoint, CheckpointError> {
    let bytes = std::fs::read(path)
        .map_err(|e| CheckpointError(format!("cannot read checkpoint {}: {e}", path.display())))?;
    from_safetensors(path, &bytes)
}
