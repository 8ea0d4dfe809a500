//! Data parallelism: the pieces of the training loop that make `world` ranks train one model
//! on one global batch, over any muon-core [`Collective`] (muon-faer's `ThreadGroup` ranks in
//! one process, its `MpiGroup` processes, one day NCCL). A process alone is a group of one, so
//! there is a single loop.
//!
//! The conventions:
//! - **Rows.** The global batch stays `B x T`. Every rank runs the same [`BatchSampler`] (same
//!   seed, same state) and draws the whole batch's windows, then keeps rows
//!   `rank * B/world .. (rank + 1) * B/world` ([`rank_rows`]). Drawing `B` windows costs a few
//!   microseconds, and it keeps the sampler's state the same on every rank: a checkpoint holds
//!   one sampler state, and a run resumes on any rank count that divides `B`. `B` must divide
//!   by the rank count (an error says so otherwise): equal rows per rank make the mean of the
//!   ranks' mean losses the global mean, and the mean of their gradients its gradient.
//! - **Gradients** are averaged by the [`DistributedOptimizer`]'s reduce-scatter (ZeRO-1: each
//!   rank keeps `1/world` of the optimizer state, Muon and AdamW parameters alike).
//! - **Small per-step values** (the loss, the balance loss, the expert loads, the stop flag)
//!   travel in one all-gather of a few floats per rank ([`StepShare`]), summed in rank order
//!   on every rank, so every rank computes the same bits: the logged loss is the global mean,
//!   and the router biases take the update the whole batch's loads call for, equal on every
//!   rank. Floats carry them exactly: a loss as three f32 parts, a load as two 16-bit halves.
//! - **Files.** Rank 0 alone writes the log and the checkpoints; every rank takes part in
//!   gathering the optimizer state (a collective), which makes a checkpoint hold the whole
//!   state, the same as a single process's.
//! - **Failures.** An error every rank sees (a bad option, a non-finite loss) ends every rank
//!   with it. Setting a run up is agreed ([`agree`]): a rank that fails alone (its output
//!   directory, its copy of a checkpoint) makes the others stop with an error naming it
//!   instead of waiting. A rank that dies mid-run leaves the others in a collective, which
//!   fails after the group's deadline (`MpiGroup`'s timeout).

use std::ops::Range;

use muon_core::{Backend, Collective, Real, Shape};

use super::TrainError;
use crate::data::BatchSampler;
use crate::model::Model;
use crate::ops::ModelOps;

/// The rows of a global batch of `batch` rows that rank `rank` of `world` trains on; an error
/// when `batch` does not divide by `world`.
pub fn rank_rows(batch: usize, world: usize, rank: usize) -> Result<Range<usize>, TrainError> {
    if world == 0 || rank >= world {
        return Err(TrainError::Config(format!("rank {rank} of a group of {world}")));
    }
    if !batch.is_multiple_of(world) {
        return Err(TrainError::Config(format!(
            "--batch {batch} does not divide by the {world} ranks: each rank takes an equal share of the global batch's rows (pick a batch that is a multiple of {world})"
        )));
    }
    let per = batch / world;
    Ok(rank * per..(rank + 1) * per)
}

/// A collective's failure as a run's error.
pub(super) fn group_error(e: muon_core::Error) -> TrainError {
    TrainError::Group(e.to_string())
}

/// Whether every rank succeeded at something each did alone: each rank's outcome goes to
/// every other (one all-gather of a flag). A rank that failed returns its own error; the
/// others return one naming the first rank that failed, so no rank waits for a peer that
/// stopped.
pub(super) fn agree<B: Backend, C: Collective<B>, T>(
    backend: &B,
    c: &C,
    outcome: Result<T, TrainError>,
) -> Result<T, TrainError> {
    let world = c.world_size();
    if world == 1 {
        return outcome;
    }
    let mut mine = backend.zeros(Shape::vector(1)).map_err(group_error)?;
    let mut all = backend.zeros(Shape::vector(world)).map_err(group_error)?;
    let flag = if outcome.is_ok() {
        B::Elem::ZERO
    } else {
        B::Elem::ONE
    };
    backend.upload(&mut mine, &[flag]).map_err(group_error)?;
    c.all_gather(backend, &mine, &mut all).map_err(group_error)?;
    let mut host = vec![B::Elem::ZERO; world];
    backend.download(&all, &mut host).map_err(group_error)?;
    match (outcome, host.iter().position(|f| *f != B::Elem::ZERO)) {
        (Err(e), _) => Err(e),
        (Ok(_), Some(r)) => Err(TrainError::Group(format!(
            "rank {r} of {world} failed to start the run (its error is in its output); rank {} stops too",
            c.rank()
        ))),
        (Ok(value), None) => Ok(value),
    }
}

/// This rank's share of the data: the global batch drawn by the shared sampler, and this
/// rank's rows of it. Buffers are allocated once.
pub(super) struct RankBatch {
    rows: Range<usize>,
    seq: usize,
    global_tokens: Vec<u32>,
    global_targets: Vec<u32>,
    /// This rank's rows, `[B / world][T]`: what the model sees.
    pub tokens: Vec<u32>,
    /// Their targets.
    pub targets: Vec<u32>,
}

impl RankBatch {
    pub fn new(batch: usize, seq: usize, world: usize, rank: usize) -> Result<RankBatch, TrainError> {
        let rows = rank_rows(batch, world, rank)?;
        let local = rows.len() * seq;
        Ok(RankBatch {
            rows,
            seq,
            global_tokens: vec![0; batch * seq],
            global_targets: vec![0; batch * seq],
            tokens: vec![0; local],
            targets: vec![0; local],
        })
    }

    /// Rows per rank.
    pub fn local_batch(&self) -> usize {
        self.rows.len()
    }

    /// Draws the next global batch from `sampler` (the same on every rank) and keeps this
    /// rank's rows in `tokens` and `targets`.
    pub fn next(&mut self, sampler: &mut BatchSampler, data: &[u16]) {
        sampler.next_batch(data, &mut self.global_tokens, &mut self.global_targets);
        let span = self.rows.start * self.seq..self.rows.end * self.seq;
        self.tokens.copy_from_slice(&self.global_tokens[span.clone()]);
        self.targets.copy_from_slice(&self.global_targets[span]);
    }
}

/// What the ranks agree on after a forward and backward: the global means and the stop flag.
#[derive(Clone, Copy, Debug)]
pub(super) struct StepTotals {
    /// The mean cross-entropy over the global batch.
    pub loss: f64,
    /// The balance loss, as the mean over the global batch's sequences.
    pub aux_loss: f64,
    /// Some rank was asked to stop (a signal): every rank stops after this step.
    pub stop: bool,
}

/// Floats a value of f64 travels in: three f32 parts that add back to it exactly (24 bits
/// each cover f64's 53 for every value in f32's range).
const F64_PARTS: usize = 3;
/// Per-step slots before the loads: the loss, the balance loss, the stop flag.
const HEAD: usize = 2 * F64_PARTS + 1;

/// The one all-gather of a step's small values, and its preallocated buffers.
pub(super) struct StepShare<B: Backend> {
    world: usize,
    width: usize,
    mine: B::Matrix,
    all: B::Matrix,
    host_mine: Vec<B::Elem>,
    host_all: Vec<B::Elem>,
    /// The summed loads, `[moe_layer][expert]`.
    loads: Vec<Vec<u32>>,
    sums: Vec<u64>,
}

impl<B: ModelOps<Elem = f32>> StepShare<B> {
    /// Buffers for a model with `moe_layers` layers of `experts` experts on a group of `world`.
    pub fn new(backend: &B, world: usize, moe_layers: usize, experts: usize) -> Result<Self, TrainError> {
        let width = HEAD + 2 * moe_layers * experts;
        Ok(StepShare {
            world,
            width,
            mine: backend.zeros(Shape::vector(width)).map_err(group_error)?,
            all: backend.zeros(Shape::vector(width * world)).map_err(group_error)?,
            host_mine: vec![0.0; width],
            host_all: vec![0.0; width * world],
            loads: vec![vec![0; experts]; moe_layers],
            sums: vec![0; moe_layers * experts],
        })
    }

    /// Shares this rank's `loss`, balance loss, expert loads and `stop` with every rank, and
    /// gives `model` the summed loads (for its router-bias update and the log). A collective.
    pub fn step<C: Collective<B>>(
        &mut self,
        backend: &B,
        c: &C,
        model: &mut Model<B>,
        loss: f64,
        stop: bool,
    ) -> Result<StepTotals, TrainError> {
        split(loss, &mut self.host_mine[0..F64_PARTS]);
        split(model.aux_loss(), &mut self.host_mine[F64_PARTS..2 * F64_PARTS]);
        self.host_mine[2 * F64_PARTS] = if stop { 1.0 } else { 0.0 };
        let counts = self.host_mine[HEAD..].chunks_exact_mut(2);
        for (pair, &count) in counts.zip(model.expert_load().iter().flatten()) {
            pair[0] = (count >> 16) as f32;
            pair[1] = (count & 0xffff) as f32;
        }
        self.exchange(backend, c)?;
        // Sums in rank order: the same bits on every rank.
        let (mut loss, mut aux, mut stop) = (0.0, 0.0, false);
        self.sums.iter_mut().for_each(|s| *s = 0);
        for rank in self.host_all.chunks_exact(self.width) {
            loss += join(&rank[0..F64_PARTS]);
            aux += join(&rank[F64_PARTS..2 * F64_PARTS]);
            stop |= rank[2 * F64_PARTS] != 0.0;
            for (sum, pair) in self.sums.iter_mut().zip(rank[HEAD..].chunks_exact(2)) {
                *sum += ((pair[0] as u64) << 16) + pair[1] as u64;
            }
        }
        for (sum, load) in self.sums.iter().zip(self.loads.iter_mut().flatten()) {
            *load = u32::try_from(*sum).map_err(|_| {
                TrainError::Group(format!("an expert load of {sum} tokens does not fit in 32 bits"))
            })?;
        }
        model.set_expert_load(backend, &self.loads)?;
        let world = self.world as f64;
        Ok(StepTotals {
            loss: loss / world,
            aux_loss: aux / world,
            stop,
        })
    }

    /// The mean over ranks of `value` (each rank's mean over its equal share). A collective.
    pub fn mean<C: Collective<B>>(&mut self, backend: &B, c: &C, value: f64) -> Result<f64, TrainError> {
        self.host_mine.iter_mut().for_each(|v| *v = 0.0);
        split(value, &mut self.host_mine[0..F64_PARTS]);
        self.exchange(backend, c)?;
        let sum: f64 = (self.host_all.chunks_exact(self.width))
            .map(|rank| join(&rank[0..F64_PARTS]))
            .sum();
        Ok(sum / self.world as f64)
    }

    fn exchange<C: Collective<B>>(&mut self, backend: &B, c: &C) -> Result<(), TrainError> {
        if self.world == 1 {
            // A group of one: nothing to exchange.
            self.host_all.copy_from_slice(&self.host_mine);
            return Ok(());
        }
        backend
            .upload(&mut self.mine, &self.host_mine)
            .map_err(group_error)?;
        c.all_gather(backend, &self.mine, &mut self.all)
            .map_err(group_error)?;
        backend
            .download(&self.all, &mut self.host_all)
            .map_err(group_error)
    }
}

/// `x` as three f32s that [`join`] adds back to `x` exactly: each part is the f32 nearest to
/// what the ones before leave, so each remainder is exact in f64 and the last part holds the
/// remaining few bits. Non-finite values travel in the first part (and stay non-finite).
fn split(x: f64, out: &mut [f32]) {
    let hi = x as f32;
    if !x.is_finite() || !hi.is_finite() {
        out.copy_from_slice(&[x as f32, 0.0, 0.0]);
        return;
    }
    let r1 = x - hi as f64;
    let mid = r1 as f32;
    let lo = (r1 - mid as f64) as f32;
    out.copy_from_slice(&[hi, mid, lo]);
}

/// The inverse of [`split`]: `hi + (mid + lo)` (the inner sum is the first remainder, exactly).
fn join(parts: &[f32]) -> f64 {
    parts[0] as f64 + (parts[1] as f64 + parts[2] as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f64_values_travel_exactly_in_three_f32s() {
        let mut parts = [0.0f32; 3];
        for i in 0..20_000 {
            let x = ((i as f64) * 0.618_033_988_749_895).sin() * 10f64.powi(i % 13 - 6) + 1.0 / 3.0;
            split(x, &mut parts);
            assert_eq!(join(&parts), x, "{x} -> {parts:?}");
        }
        for x in [
            0.0,
            -0.0,
            5.545_177_444_479_562,
            f64::NAN,
            f64::INFINITY,
            -f64::INFINITY,
        ] {
            split(x, &mut parts);
            let back = join(&parts);
            assert!(back == x || (x.is_nan() && back.is_nan()), "{x} -> {back}");
        }
        // Beyond f32's range the value is not finite on the way; it must not turn finite.
        split(1e300, &mut parts);
        assert!(!join(&parts).is_finite());
    }

    #[test]
    fn ranks_split_the_rows_evenly_or_refuse() {
        assert_eq!(rank_rows(8, 1, 0).unwrap(), 0..8);
        assert_eq!(rank_rows(8, 4, 0).unwrap(), 0..2);
        assert_eq!(rank_rows(8, 4, 3).unwrap(), 6..8);
        let tiled: Vec<usize> = (0..4).flat_map(|r| rank_rows(12, 4, r).unwrap()).collect();
        assert_eq!(tiled, (0..12).collect::<Vec<_>>());
        let e = rank_rows(6, 4, 0).unwrap_err().to_string();
        assert!(e.contains("--batch 6 does not divide by the 4 ranks"), "{e}");
        assert!(rank_rows(8, 2, 2).is_err());
    }

    #[test]
    fn the_ranks_rows_are_the_single_batchs_rows() {
        let data: Vec<u16> = (0..500).map(|i| (i * 7 % 256) as u16).collect();
        let (b, t) = (4, 5);
        let mut single = BatchSampler::new(9, b, t);
        let (mut x, mut y) = (vec![0; b * t], vec![0; b * t]);
        let mut samplers: Vec<BatchSampler> = (0..2).map(|_| BatchSampler::new(9, b, t)).collect();
        let mut ranks: Vec<RankBatch> = (0..2).map(|r| RankBatch::new(b, t, 2, r).unwrap()).collect();
        for _ in 0..3 {
            single.next_batch(&data, &mut x, &mut y);
            for (r, (rank, sampler)) in ranks.iter_mut().zip(&mut samplers).enumerate() {
                rank.next(sampler, &data);
                let span = r * 2 * t..(r + 1) * 2 * t;
                assert_eq!(rank.tokens, x[span.clone()]);
                assert_eq!(rank.targets, y[span]);
                assert_eq!(sampler.state(), single.state());
            }
        }
    }
}
