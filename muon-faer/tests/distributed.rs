//! Distributed Muon (muon-core's `DistributedOptimizer`) over `ThreadGroup` ranks, against the
//! single-rank `HybridOptimizer` stepping with the mean of the ranks' gradients: the same
//! result up to rounding (docs/DESIGN.md §3).

mod common;

use std::thread;

use common::{host, max_abs_diff, upload, Rng};
use muon_core::{
    Backend, Collective, DistributedOptimizer, Error, HostMatrix, HybridConfig, HybridOptimizer,
    NewtonSchulz, OptimizerKind, OptimizerState, ParamRole, ParamSpec, Real, Shape,
};
use muon_faer::{Faer, ThreadGroup, Traffic};

/// Lengths chosen so shards split unevenly: 91 over 2, 3 and 4 ranks, a 3-vector whose last
/// rank owns nothing over 4 ranks, an expert stack, a tall matrix and two AdamW tensors.
fn specs() -> Vec<ParamSpec> {
    vec![
        ParamSpec::new("embed", Shape::matrix(20, 6), ParamRole::Embedding),
        ParamSpec::new("wq", Shape::matrix(16, 24), ParamRole::Hidden),
        ParamSpec::new("odd", Shape::matrix(7, 13), ParamRole::Hidden),
        ParamSpec::new("tall", Shape::matrix(24, 10), ParamRole::Hidden),
        ParamSpec::new("experts", Shape::batched(3, 8, 12), ParamRole::Hidden),
        ParamSpec::new("norm", Shape::vector(3), ParamRole::Norm),
    ]
}

fn config() -> HybridConfig {
    let mut config = HybridConfig::default();
    config.muon.newton_schulz = NewtonSchulz::polar_express();
    config
}

/// Rank `rank`'s gradient of parameter `p` at step `step`: seeded, different on every rank.
fn grad(spec: &ParamSpec, p: usize, step: usize, rank: usize) -> Vec<f64> {
    Rng::new((step * 1000 + p * 10 + rank) as u64).vec(spec.shape.len())
}

/// The mean of the ranks' gradients as `ThreadGroup` forms it: summed in rank order in the
/// element type, times `1 / world`.
fn mean_grad<T: Real>(spec: &ParamSpec, p: usize, step: usize, world: usize) -> Vec<f64> {
    let mut sum = vec![T::ZERO; spec.shape.len()];
    for rank in 0..world {
        for (s, g) in sum.iter_mut().zip(grad(spec, p, step, rank)) {
            *s += T::from_f64(g);
        }
    }
    let inverse = T::from_f64(1.0 / world as f64);
    sum.iter().map(|&s| (s * inverse).to_f64()).collect()
}

fn initial_params(specs: &[ParamSpec]) -> Vec<Vec<f64>> {
    specs
        .iter()
        .enumerate()
        .map(|(p, s)| Rng::new(77 + p as u64).vec(s.shape.len()))
        .collect()
}

const LRS: [f64; 4] = [0.02, 0.015, 0.01, 0.005];

/// What one rank saw: its parameters after each step, the reports, the update RMS, the state.
struct RankRun {
    params: Vec<Vec<Vec<f64>>>,
    grad_norms: Vec<f64>,
    update_rms: Vec<Vec<f64>>,
    state: OptimizerState<f64>,
    state_len: usize,
    traffic: Traffic,
    /// The share of the Newton-Schulz flops this rank computed.
    ns_share: f64,
}

/// What the two optimizers under comparison share, for `drive`.
trait Optimizer<T: faer_elem::Elem> {
    fn import(&mut self, cpu: &Faer<T>, state: &OptimizerState<T>);
    fn step(&mut self, cpu: &Faer<T>, params: &mut [HostMatrix<T>], grads: &[HostMatrix<T>], lr: f64) -> f64;
    fn rms(&mut self, cpu: &Faer<T>, out: &mut [f64]);
    fn export(&self, cpu: &Faer<T>) -> OptimizerState<T>;
}

impl<T: faer_elem::Elem> Optimizer<T> for HybridOptimizer<Faer<T>> {
    fn import(&mut self, cpu: &Faer<T>, state: &OptimizerState<T>) {
        self.import_state(cpu, state).unwrap()
    }
    fn step(&mut self, cpu: &Faer<T>, params: &mut [HostMatrix<T>], grads: &[HostMatrix<T>], lr: f64) -> f64 {
        HybridOptimizer::step(self, cpu, params, grads, lr)
            .unwrap()
            .grad_norm
    }
    fn rms(&mut self, cpu: &Faer<T>, out: &mut [f64]) {
        self.update_rms(cpu, out).unwrap()
    }
    fn export(&self, cpu: &Faer<T>) -> OptimizerState<T> {
        self.export_state(cpu).unwrap()
    }
}

impl<T: faer_elem::Elem> Optimizer<T> for DistributedOptimizer<Faer<T>, ThreadGroup<T>> {
    fn import(&mut self, cpu: &Faer<T>, state: &OptimizerState<T>) {
        self.import_state(cpu, state).unwrap()
    }
    fn step(&mut self, cpu: &Faer<T>, params: &mut [HostMatrix<T>], grads: &[HostMatrix<T>], lr: f64) -> f64 {
        DistributedOptimizer::step(self, cpu, params, grads, lr)
            .unwrap()
            .grad_norm
    }
    fn rms(&mut self, cpu: &Faer<T>, out: &mut [f64]) {
        self.update_rms(cpu, out).unwrap()
    }
    fn export(&self, cpu: &Faer<T>) -> OptimizerState<T> {
        self.export_state(cpu).unwrap()
    }
}

/// Takes `steps` (indices into `LRS`) with `opt`, from `start` (parameters and state) or the
/// initial parameters, feeding `grad(spec, index, step)`; records what `RankRun` holds.
fn drive<T: faer_elem::Elem>(
    cpu: &Faer<T>,
    opt: &mut impl Optimizer<T>,
    steps: std::ops::Range<usize>,
    start: Option<(Vec<Vec<f64>>, OptimizerState<f64>)>,
    grad: impl Fn(&ParamSpec, usize, usize) -> Vec<f64>,
) -> RankRun {
    let specs = specs();
    let start_params = match &start {
        Some((params, state)) => {
            opt.import(cpu, &cast_state(state));
            params.clone()
        }
        None => initial_params(&specs),
    };
    let mut params: Vec<HostMatrix<T>> = specs
        .iter()
        .zip(&start_params)
        .map(|(s, p)| upload(cpu, s.shape, p))
        .collect();
    let mut run = RankRun {
        params: Vec::new(),
        grad_norms: Vec::new(),
        update_rms: Vec::new(),
        state: OptimizerState {
            step: 0,
            params: Vec::new(),
        },
        state_len: 0,
        traffic: Traffic::default(),
        ns_share: 1.0,
    };
    for step in steps {
        let grads: Vec<HostMatrix<T>> = specs
            .iter()
            .enumerate()
            .map(|(p, s)| upload(cpu, s.shape, &grad(s, p, step)))
            .collect();
        run.grad_norms.push(opt.step(cpu, &mut params, &grads, LRS[step]));
        let mut rms = vec![0.0; specs.len()];
        opt.rms(cpu, &mut rms);
        run.update_rms.push(rms);
        run.params.push(params.iter().map(|m| host(cpu, m)).collect());
    }
    run.state = widen_state(&opt.export(cpu));
    run
}

/// Runs `steps` on `world` ranks, each a thread with a one-thread faer backend.
fn run_ranks<T: faer_elem::Elem>(
    world: usize,
    steps: std::ops::Range<usize>,
    start: Option<(Vec<Vec<f64>>, OptimizerState<f64>)>,
) -> Vec<RankRun> {
    run_ranks_with::<T>(world, steps, start, false)
}

/// `run_ranks`, with each matrix's Newton-Schulz on one owner rank when `round_robin`.
fn run_ranks_with<T: faer_elem::Elem>(
    world: usize,
    steps: std::ops::Range<usize>,
    start: Option<(Vec<Vec<f64>>, OptimizerState<f64>)>,
    round_robin: bool,
) -> Vec<RankRun> {
    let handles: Vec<_> = ThreadGroup::<T>::new(world)
        .into_iter()
        .map(|group| {
            let (steps, start) = (steps.clone(), start.clone());
            thread::spawn(move || {
                let cpu = Faer::<T>::with_threads(1);
                let rank = group.rank();
                let mut opt = DistributedOptimizer::new(&cpu, group, specs(), config())
                    .unwrap()
                    .with_round_robin_newton_schulz(&cpu, round_robin)
                    .unwrap();
                let mut run = drive(&cpu, &mut opt, steps, start, |s, p, step| grad(s, p, step, rank));
                run.state_len = opt.state_len();
                run.ns_share = opt.newton_schulz_share();
                // After export's last collective: every rank has posted everything.
                run.traffic = opt.collective().traffic();
                run
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

/// The same steps on one `HybridOptimizer`, fed the ranks' mean gradients.
fn run_single<T: faer_elem::Elem>(
    world: usize,
    steps: std::ops::Range<usize>,
    start: Option<(Vec<Vec<f64>>, OptimizerState<f64>)>,
) -> RankRun {
    let cpu = Faer::<T>::with_threads(1);
    let specs = specs();
    let mut opt = HybridOptimizer::new(&cpu, specs.clone(), config()).unwrap();
    let mut run = drive(&cpu, &mut opt, steps, start, |s, p, step| {
        mean_grad::<T>(s, p, step, world)
    });
    run.state_len = specs
        .iter()
        .map(|s| match s.optimizer() {
            OptimizerKind::Muon => s.shape.len(),
            OptimizerKind::AdamW => 2 * s.shape.len(),
        })
        .sum();
    run
}

mod faer_elem {
    /// The element types both optimizers and `ThreadGroup` run on here.
    pub trait Elem: muon_faer::Elem + Send + Sync + 'static {}
    impl Elem for f32 {}
    impl Elem for f64 {}
}

fn widen_state<T: Real>(state: &OptimizerState<T>) -> OptimizerState<f64> {
    map_state(state, |v| v.to_f64())
}

fn cast_state<T: Real>(state: &OptimizerState<f64>) -> OptimizerState<T> {
    map_state(state, T::from_f64)
}

fn map_state<A: Copy, B>(state: &OptimizerState<A>, f: impl Fn(A) -> B + Copy) -> OptimizerState<B> {
    OptimizerState {
        step: state.step,
        params: state
            .params
            .iter()
            .map(|p| muon_core::ParamState {
                name: p.name.clone(),
                shape: p.shape,
                kind: p.kind,
                buffers: p
                    .buffers
                    .iter()
                    .map(|b| b.iter().map(|&v| f(v)).collect())
                    .collect(),
            })
            .collect(),
    }
}

/// Largest difference between two runs, over every parameter after every step, every update
/// RMS, the gradient norms and the final state, relative to the values' scale (all are O(1)).
fn worst_difference(a: &RankRun, b: &RankRun) -> f64 {
    let mut worst: f64 = 0.0;
    for (pa, pb) in a.params.iter().zip(&b.params) {
        for (x, y) in pa.iter().zip(pb) {
            worst = worst.max(max_abs_diff(x, y));
        }
    }
    for (x, y) in a.update_rms.iter().zip(&b.update_rms) {
        worst = worst.max(max_abs_diff(x, y));
    }
    worst = worst.max(max_abs_diff(&a.grad_norms, &b.grad_norms) / a.grad_norms[0]);
    assert_eq!(a.state.step, b.state.step);
    for (sa, sb) in a.state.params.iter().zip(&b.state.params) {
        assert_eq!((&sa.name, sa.kind), (&sb.name, sb.kind));
        for (x, y) in sa.buffers.iter().zip(&sb.buffers) {
            worst = worst.max(max_abs_diff(x, y));
        }
    }
    worst
}

#[test]
fn distributed_steps_equal_single_rank_steps_on_the_mean_gradient() {
    // Each rank applies to its slice the elementwise operations the single-rank optimizer
    // applies to the whole, and runs Newton-Schulz on the same gathered matrix; the mean
    // gradient is formed in the same order. Only the squared norms are summed in another order
    // (per shard, then over ranks), and they are reports that never reach the parameters. So
    // the runs agree to a few roundings at most: an elementwise kernel may round its vector
    // body and its tail differently (one fused multiply-add or two operations), and where a
    // slice starts moves elements between the two. Values are O(1): a few ulps are 1e-15 in
    // f64 and 1e-6 in f32, and 3 steps of Newton-Schulz amplify such a difference by O(10);
    // the norms are sums of ~1e3 terms (relative error ~1e-13 / 1e-5).
    for world in [1, 2, 3, 4] {
        let ranks = run_ranks::<f64>(world, 0..3, None);
        let single = run_single::<f64>(world, 0..3, None);
        for (rank, run) in ranks.iter().enumerate() {
            let worst = worst_difference(run, &single);
            assert!(
                worst <= 1e-12,
                "f64, rank {rank} of {world}: differs from single-rank by {worst:e}"
            );
        }
    }
    for world in [2, 3] {
        let ranks = run_ranks::<f32>(world, 0..3, None);
        let single = run_single::<f32>(world, 0..3, None);
        for (rank, run) in ranks.iter().enumerate() {
            let worst = worst_difference(run, &single);
            assert!(
                worst <= 1e-5,
                "f32, rank {rank} of {world}: differs from single-rank by {worst:e}"
            );
        }
    }
}

#[test]
fn the_step_follows_the_mean_gradient_not_one_ranks() {
    // Guard against a group that forgets to communicate: with two ranks, a single-rank step
    // on rank 0's own gradient must differ clearly from the distributed step.
    let ranks = run_ranks::<f64>(2, 0..1, None);
    let own = run_single::<f64>(1, 0..1, None); // the "mean" over one rank: rank 0's gradient
    let worst = worst_difference(&ranks[0], &own);
    assert!(
        worst > 1e-4,
        "two ranks stepped like rank 0 alone (difference {worst:e})"
    );
}

#[test]
fn state_saved_on_three_ranks_resumes_on_two_and_on_one() {
    // Steps 0-1 on 3 ranks; the whole state (gathered) then resumes steps 2-3 on 2 ranks and
    // on a single-rank optimizer. The later steps' mean is over 2 ranks in both, so the two
    // resumed runs agree as in the test above.
    let first = run_ranks::<f64>(3, 0..2, None);
    for run in &first[1..] {
        assert_eq!(run.state, first[0].state, "ranks exported different state");
    }
    let start = (first[0].params.last().unwrap().clone(), first[0].state.clone());
    assert_eq!(start.1.step, 2);
    let resumed = run_ranks::<f64>(2, 2..4, Some(start.clone()));
    let single = run_single::<f64>(2, 2..4, Some(start));
    for run in &resumed {
        assert_eq!(run.state.step, 4);
        let worst = worst_difference(run, &single);
        assert!(worst <= 1e-12, "resumed on 2 ranks differs from 1 by {worst:e}");
    }
}

#[test]
fn each_rank_holds_a_shard_of_the_state_and_muon_half_of_adamws() {
    // The report: optimizer memory per rank is 1/world of the whole, and Muon's is half of
    // AdamW's (one buffer, not two). Shards round up, so a rank holds at most one extra
    // element per buffer.
    let single = run_single::<f64>(1, 0..0, None).state_len;
    for world in [2, 3, 4] {
        let ranks = run_ranks::<f64>(world, 0..0, None);
        let buffers = 1 + 2 + 1 + 1 + 1 + 2;
        for run in &ranks {
            let ideal = single as f64 / world as f64;
            assert!(
                (run.state_len as f64) >= ideal && (run.state_len as f64) < ideal + buffers as f64,
                "{world} ranks: {} elements of state per rank, whole {single}",
                run.state_len
            );
        }
    }
    let cpu = Faer::<f64>::with_threads(1);
    let matrix = Shape::matrix(64, 96);
    let state_of = |kind| {
        let group = ThreadGroup::<f64>::new(1).pop().unwrap();
        let spec = ParamSpec::new("w", matrix, ParamRole::Hidden).with_optimizer(kind);
        DistributedOptimizer::new(&cpu, group, vec![spec], HybridConfig::default())
            .unwrap()
            .state_len()
    };
    assert_eq!(2 * state_of(OptimizerKind::Muon), state_of(OptimizerKind::AdamW));
}

#[test]
fn muon_moves_its_n_t_on_top_of_adamws_traffic() {
    // Per step: reduce-scatter every gradient; all-gather every parameter, Muon's N_t, and the
    // one vector of squared norms (one entry per parameter and rank). Twice per step with the
    // update-RMS read in `run_ranks`.
    let specs = specs();
    let world = 3;
    let steps = 2u64;
    let all: u64 = specs.iter().map(|s| s.shape.len() as u64).sum();
    let muon: u64 = specs
        .iter()
        .filter(|s| s.optimizer() == OptimizerKind::Muon)
        .map(|s| s.shape.len() as u64)
        .sum();
    let norms = 2 * (specs.len() * world) as u64;
    let ranks = run_ranks::<f64>(world, 0..steps as usize, None);
    // Export gathers every state buffer once more.
    let state: u64 = specs
        .iter()
        .map(|s| match s.optimizer() {
            OptimizerKind::Muon => s.shape.len() as u64,
            OptimizerKind::AdamW => 2 * s.shape.len() as u64,
        })
        .sum();
    let bytes = 8; // f64
    let expected = Traffic {
        reduce_scatter: bytes * steps * all,
        all_gather: bytes * (steps * (all + muon + norms) + state),
        broadcast: 0,
    };
    assert_eq!(ranks[0].traffic, expected);
}

#[test]
fn a_non_finite_gradient_on_one_rank_stops_every_rank() {
    let world = 3;
    let handles: Vec<_> = ThreadGroup::<f32>::new(world)
        .into_iter()
        .map(|group| {
            thread::spawn(move || {
                let cpu = Faer::<f32>::with_threads(1);
                let specs = specs();
                let rank = group.rank();
                let mut opt = DistributedOptimizer::new(&cpu, group, specs.clone(), config()).unwrap();
                let mut params: Vec<HostMatrix<f32>> = specs
                    .iter()
                    .zip(initial_params(&specs))
                    .map(|(s, p)| upload(&cpu, s.shape, &p))
                    .collect();
                let make_grads = |step| -> Vec<HostMatrix<f32>> {
                    specs
                        .iter()
                        .enumerate()
                        .map(|(p, s)| upload(&cpu, s.shape, &grad(s, p, step, rank)))
                        .collect()
                };
                opt.step(&cpu, &mut params, &make_grads(0), 0.01).unwrap();
                let before: Vec<Vec<f64>> = params.iter().map(|m| host(&cpu, m)).collect();
                let state_before = opt.export_state(&cpu).unwrap();
                let mut grads = make_grads(1);
                if rank == 1 {
                    grads[2].as_mut_slice()[40] = f32::NAN;
                }
                let err = opt.step(&cpu, &mut params, &grads, 0.01).unwrap_err();
                let after: Vec<Vec<f64>> = params.iter().map(|m| host(&cpu, m)).collect();
                assert_eq!(before, after, "rank {rank}: parameters changed");
                assert_eq!(
                    state_before,
                    opt.export_state(&cpu).unwrap(),
                    "rank {rank}: state changed"
                );
                assert_eq!(opt.steps_taken(), 1);
                err
            })
        })
        .collect();
    for (rank, h) in handles.into_iter().enumerate() {
        let err = h.join().unwrap();
        assert_eq!(
            err,
            Error::NonFiniteGradient {
                index: 2,
                name: "odd".into()
            },
            "rank {rank}"
        );
    }
}

#[test]
fn a_rank_that_leaves_fails_the_others_instead_of_hanging() {
    let mut group = ThreadGroup::<f64>::new(2);
    let leaver = group.pop().unwrap();
    let stayer = group.pop().unwrap();
    let waiting = thread::spawn(move || {
        let cpu = Faer::<f64>::with_threads(1);
        let specs = specs();
        let mut opt = DistributedOptimizer::new(&cpu, stayer, specs.clone(), config()).unwrap();
        let mut params: Vec<HostMatrix<f64>> = specs.iter().map(|s| HostMatrix::zeros(s.shape)).collect();
        let grads = params.clone();
        opt.step(&cpu, &mut params, &grads, 0.01).unwrap_err()
    });
    thread::sleep(std::time::Duration::from_millis(50));
    drop(leaver);
    let err = waiting.join().unwrap();
    assert!(
        matches!(&err, Error::Collective(msg) if msg.contains("left the group")),
        "got {err}"
    );
}

#[test]
fn collectives_name_a_shard_of_the_wrong_length() {
    let cpu = Faer::<f64>::with_threads(1);
    let group = ThreadGroup::<f64>::new(1).pop().unwrap();
    let full = cpu.zeros(Shape::matrix(4, 5)).unwrap();
    let mut shard = cpu.zeros(Shape::vector(19)).unwrap();
    let err = Collective::<Faer<f64>>::copy_shard(&group, &cpu, &full, &mut shard).unwrap_err();
    assert!(err.to_string().contains("expected 20"), "{err}");
    let err = Collective::<Faer<f64>>::reduce_scatter_mean(&group, &cpu, &full, &mut shard).unwrap_err();
    assert!(err.to_string().contains("reduce-scatter"), "{err}");
}

/// One step of a matrices-only model (the report's accounting: every parameter a matrix) on
/// 2 f32 ranks; returns the step's traffic and the parameters after it.
fn one_step_traffic(kind: OptimizerKind, bf16_gather: bool) -> (Traffic, Vec<Vec<f64>>) {
    let specs: Vec<ParamSpec> = [(32, 48), (48, 32), (40, 40)]
        .iter()
        .enumerate()
        .map(|(i, &(r, c))| {
            ParamSpec::new(format!("w{i}"), Shape::matrix(r, c), ParamRole::Hidden).with_optimizer(kind)
        })
        .collect();
    let handles: Vec<_> = ThreadGroup::<f32>::new(2)
        .into_iter()
        .map(|group| {
            let specs = specs.clone();
            thread::spawn(move || {
                let cpu = Faer::<f32>::with_threads(1);
                let rank = group.rank();
                let mut opt = DistributedOptimizer::new(&cpu, group, specs.clone(), HybridConfig::default())
                    .unwrap()
                    .with_bf16_gather(bf16_gather);
                let mut params: Vec<HostMatrix<f32>> = specs
                    .iter()
                    .zip(initial_params(&specs))
                    .map(|(s, p)| upload(&cpu, s.shape, &p))
                    .collect();
                let grads: Vec<HostMatrix<f32>> = specs
                    .iter()
                    .enumerate()
                    .map(|(p, s)| upload(&cpu, s.shape, &grad(s, p, 0, rank)))
                    .collect();
                opt.step(&cpu, &mut params, &grads, 0.02).unwrap();
                // A last collective, so every rank's step is counted when this rank reads.
                let mut rms = vec![0.0; specs.len()];
                opt.update_rms(&cpu, &mut rms).unwrap();
                (
                    opt.collective().traffic(),
                    params.iter().map(|m| host(&cpu, m)).collect::<Vec<_>>(),
                )
            })
        })
        .collect();
    let mut results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    results.pop().unwrap()
}

#[test]
fn muon_communicates_1_25x_adamws_bytes_with_n_t_in_bf16() {
    // The report: Distributed Muon's communication is 1 to 1.25x AdamW's (ZeRO-1). Per step
    // and parameter element, AdamW reduce-scatters the f32 gradient (4 bytes) and all-gathers
    // the f32 parameter (4); Muon also all-gathers N_t: 2 bytes in bf16, 1.25x in all, or 4
    // bytes in f32, 1.5x. The small vectors of norms (two per step, 8 floats each) add 0.2%.
    let (adamw, _) = one_step_traffic(OptimizerKind::AdamW, false);
    let (muon_f32, exact) = one_step_traffic(OptimizerKind::Muon, false);
    let (muon_bf16, rounded) = one_step_traffic(OptimizerKind::Muon, true);
    let total = |t: Traffic| (t.reduce_scatter + t.all_gather) as f64;
    let bf16_ratio = total(muon_bf16) / total(adamw);
    let f32_ratio = total(muon_f32) / total(adamw);
    eprintln!("traffic per step vs AdamW: Muon, N_t in bf16 {bf16_ratio:.4}x; in f32 {f32_ratio:.4}x");
    assert!(
        (bf16_ratio - 1.25).abs() < 3e-3,
        "bf16 gather: {bf16_ratio}x AdamW's traffic"
    );
    assert!(
        (f32_ratio - 1.5).abs() < 3e-3,
        "f32 gather: {f32_ratio}x AdamW's traffic"
    );

    // The rounding reaches the parameters, but only at bf16's scale: each N_t element moves
    // by at most 2^-9 relative, Newton-Schulz (normalized, about norm-preserving) turns that
    // into an update error of the same order, and the update is lr * 0.2 * sqrt(max side)
    // times O (about 0.02 * 0.2 * 7 = 0.03 per element at most here), so the parameters move
    // by well under 0.03 * 2^-9 * 10 = 6e-4 (a factor 10 for the iteration's amplification).
    let worst = exact
        .iter()
        .zip(&rounded)
        .map(|(a, b)| max_abs_diff(a, b))
        .fold(0.0, f64::max);
    eprintln!("bf16 gather: parameters within {worst:e} of the f32 gather's");
    assert!(worst > 0.0, "a bf16 gather changed nothing: N_t was not rounded");
    assert!(worst < 6e-4, "bf16 gather moved a parameter by {worst:e}");
}

#[test]
fn round_robin_newton_schulz_gives_the_same_steps_for_a_share_of_the_work() {
    // Each matrix's Newton-Schulz runs on its owner and is broadcast: the same numbers as when
    // every rank runs it (the same routine on the same gathered input), so the bound of the
    // first test holds; each rank computes only its owners' share of the flops.
    let ns = config().muon.newton_schulz;
    let muon_flops: Vec<f64> = (specs().iter())
        .filter(|s| s.optimizer() == OptimizerKind::Muon)
        .map(|s| ns.flops(s.shape))
        .collect();
    let largest_share = muon_flops.iter().cloned().fold(0.0, f64::max) / muon_flops.iter().sum::<f64>();
    for world in [2, 3, 4] {
        let ranks = run_ranks_with::<f64>(world, 0..3, None, true);
        let single = run_single::<f64>(world, 0..3, None);
        let mut total_share = 0.0;
        for (rank, run) in ranks.iter().enumerate() {
            let worst = worst_difference(run, &single);
            assert!(
                worst <= 1e-12,
                "round robin, rank {rank} of {world}: differs by {worst:e}"
            );
            total_share += run.ns_share;
            // Greedy by flops: no rank carries more than an even share plus the largest matrix.
            let bound = 1.0 / world as f64 + largest_share + 1e-12;
            assert!(
                run.ns_share <= bound,
                "rank {rank} of {world}: share {} > {bound}",
                run.ns_share
            );
        }
        assert!(
            (total_share - 1.0).abs() < 1e-12,
            "{world} ranks: shares add up to {total_share}"
        );
        // One broadcast of every Muon matrix per step, 8 bytes an element.
        let muon: u64 = specs()
            .iter()
            .filter(|s| s.optimizer() == OptimizerKind::Muon)
            .map(|s| s.shape.len() as u64)
            .sum();
        assert_eq!(ranks[0].traffic.broadcast, 3 * 8 * muon);
    }
}
