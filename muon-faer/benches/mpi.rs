//! Distributed Muon across MPI processes: the optimizer step of benches/distributed.rs's
//! MoE-like model on 1, 2 and 4 ranks (one process and one thread each), split by phase, and
//! an alpha-beta model of the collectives fitted to this machine, projected to 8-64 ranks.
//!
//! ```text
//! cargo bench -p muon-faer --features mpi --bench mpi -- [--ranks 1,2,4] [--steps 5] [--rounds 2]
//! ```
//! The binary launches `mpirun --oversubscribe -np N` on itself for each rank count, round by
//! round (the machines here are shared and noisy: compare within a round). Every rank runs
//! round-robin Newton-Schulz with `N_t` gathered in bf16 (the report's setting). JSON lines on
//! stdout:
//!
//! - `"case":"step"`: per round and rank count, each rank's median step of `steps` (after a
//!   warm-up step), averaged over ranks, split into reduce-scatter (gradients), all-gather
//!   (`N_t` and the vector of norms), broadcast (the owners' Newton-Schulz results, and the
//!   wait for the slowest owner), parameter gather, Newton-Schulz (this rank's own matrices:
//!   the gap between the step's last gather and its first broadcast) and compute (the rest:
//!   momentum, AdamW, the update, copies); bytes per step per rank as `MpiGroup::traffic`
//!   counts them; at one rank also a `HybridOptimizer` step on one thread, stepping in turn
//!   with it in the same process (`single_ms`).
//! - `"case":"collective"`: median time of one reduce-scatter, all-gather and broadcast of
//!   vectors of 2^10..2^22 f32 at 2 and 4 ranks, through `MpiGroup` (its staging copies
//!   included).
//! - `"case":"fit"`: per collective, `t = steps(p) alpha + volume(p) bytes beta` fitted by least
//!   squares, with a ring's `steps = p - 1`, `volume = (p - 1) / p` for the reduce-scatter
//!   (an all-to-all moves the same) and the all-gather, and a binomial tree's `log2 p`, `log2 p`
//!   for the broadcast.
//! - `"case":"projection"`: the step at 8-64 ranks from the fit and the 1-rank phases: compute
//!   over `p` (it works on shards), the 1-rank Newton-Schulz times the most loaded owner's share
//!   (greedy by flops, as the optimizer assigns them), every collective of a step from the
//!   model, nothing overlapped; also with an
//!   assumed network (`--link-gbps`, default 100, and `--latency-us`, default 2) in place of
//!   this machine's shared memory.

use std::cell::{Cell, RefCell};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use muon_core::{
    Collective, DistributedOptimizer, HostMatrix, HybridConfig, HybridOptimizer, OptimizerKind, ParamRole,
    ParamSpec, Portable, Result, Shape,
};
use muon_faer::{Faer, MpiGroup};

/// benches/distributed.rs's model: 16.5M parameters, attention matrices and two 16-expert
/// stacks per layer (Muon), an embedding and norm gains (AdamW).
fn specs() -> Vec<ParamSpec> {
    let (dim, experts, width) = (384, 16, 256);
    let mut specs = vec![ParamSpec::new(
        "embed",
        Shape::matrix(4096, dim),
        ParamRole::Embedding,
    )];
    for l in 0..4 {
        let p = |n: &str| format!("layers.{l}.{n}");
        specs.extend([
            ParamSpec::new(p("wq"), Shape::matrix(dim, dim), ParamRole::Hidden),
            ParamSpec::new(p("wkv"), Shape::matrix(2 * dim, dim), ParamRole::Hidden),
            ParamSpec::new(p("wo"), Shape::matrix(dim, dim), ParamRole::Hidden),
            ParamSpec::new(p("router"), Shape::matrix(experts, dim), ParamRole::Hidden),
            ParamSpec::new(p("w_up"), Shape::batched(experts, width, dim), ParamRole::Hidden),
            ParamSpec::new(
                p("w_down"),
                Shape::batched(experts, dim, width),
                ParamRole::Hidden,
            ),
            ParamSpec::new(p("norm"), Shape::vector(dim), ParamRole::Norm),
        ]);
    }
    specs
}

fn tensors(specs: &[ParamSpec], seed: usize) -> Vec<HostMatrix<f32>> {
    (specs.iter())
        .map(|s| {
            let data =
                (0..s.shape.len()).map(|i| (((i * 7919 + seed * 104_729) % 1013) as f32 - 506.0) / 506.0);
            HostMatrix::from_vec(s.shape, data.collect()).unwrap()
        })
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

// ---------------------------------------------------------------------------------------------
// Rank mode.

/// The phases a step's collectives are charged to.
#[derive(Clone, Copy)]
enum Phase {
    ReduceScatter,
    AllGather,
    Broadcast,
    ParamGather,
}
const PHASES: usize = 4;

/// `MpiGroup`, timing each collective by phase. An all-gather into one of the parameters
/// (whose addresses it is given) is a parameter gather; any other is `N_t`'s or the norms'.
///
/// It also times the owners' Newton-Schulz: with round robin, a step runs every rank's own
/// matrices' Newton-Schulz, and nothing else, between its last gather and its first broadcast
/// (`DistributedOptimizer::step`), so that gap is charged to Newton-Schulz.
struct Timed {
    inner: MpiGroup<f32>,
    params: RefCell<Vec<usize>>,
    spent: Cell<[Duration; PHASES]>,
    newton_schulz: Cell<Duration>,
    /// When the last collective returned, and whether a broadcast has run since `reset`.
    last_end: Cell<Option<Instant>>,
    broadcasting: Cell<bool>,
}

impl Timed {
    fn new(inner: MpiGroup<f32>) -> Self {
        Timed {
            inner,
            params: RefCell::new(Vec::new()),
            spent: Cell::new([Duration::ZERO; PHASES]),
            newton_schulz: Cell::new(Duration::ZERO),
            last_end: Cell::new(None),
            broadcasting: Cell::new(false),
        }
    }

    /// Zeroes the times, before a step.
    fn reset(&self) {
        self.spent.set([Duration::ZERO; PHASES]);
        self.newton_schulz.set(Duration::ZERO);
        self.last_end.set(None);
        self.broadcasting.set(false);
    }

    /// This step's times: the phases', then Newton-Schulz's (ms).
    fn times(&self) -> [f64; PHASES + 1] {
        let mut out = [0.0; PHASES + 1];
        for (o, d) in out.iter_mut().zip(self.spent.get()) {
            *o = d.as_secs_f64() * 1e3;
        }
        out[PHASES] = self.newton_schulz.get().as_secs_f64() * 1e3;
        out
    }

    fn time<R>(&self, phase: Phase, f: impl FnOnce() -> R) -> R {
        let start = Instant::now();
        if matches!(phase, Phase::Broadcast) && !self.broadcasting.replace(true) {
            if let Some(end) = self.last_end.get() {
                self.newton_schulz.set(start - end);
            }
        }
        let r = f();
        let end = Instant::now();
        let mut spent = self.spent.get();
        spent[phase as usize] += end - start;
        self.spent.set(spent);
        self.last_end.set(Some(end));
        r
    }
}

type Cpu = Faer<f32>;

impl Collective<Cpu> for Timed {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world_size(&self) -> usize {
        self.inner.world_size()
    }
    fn reduce_scatter_mean(
        &self,
        b: &Cpu,
        full: &HostMatrix<f32>,
        shard: &mut HostMatrix<f32>,
    ) -> Result<()> {
        self.time(Phase::ReduceScatter, || {
            self.inner.reduce_scatter_mean(b, full, shard)
        })
    }
    fn all_gather(&self, b: &Cpu, shard: &HostMatrix<f32>, full: &mut HostMatrix<f32>) -> Result<()> {
        let address = full.as_slice().as_ptr() as usize;
        let phase = match self.params.borrow().contains(&address) {
            true => Phase::ParamGather,
            false => Phase::AllGather,
        };
        self.time(phase, || self.inner.all_gather(b, shard, full))
    }
    fn all_gather_bf16(&self, b: &Cpu, shard: &HostMatrix<f32>, full: &mut HostMatrix<f32>) -> Result<()> {
        self.time(Phase::AllGather, || self.inner.all_gather_bf16(b, shard, full))
    }
    fn copy_shard(&self, b: &Cpu, full: &HostMatrix<f32>, shard: &mut HostMatrix<f32>) -> Result<()> {
        self.inner.copy_shard(b, full, shard)
    }
    fn broadcast(&self, b: &Cpu, root: usize, full: &mut HostMatrix<f32>) -> Result<()> {
        self.time(Phase::Broadcast, || self.inner.broadcast(b, root, full))
    }
}

/// Every rank's values of `mine`, gathered (as the trainer gathers losses: a `1 x world k`
/// matrix), in rank order.
fn gather_all(root: &MpiGroup<f64>, mine: &[f64]) -> Vec<f64> {
    let cpu = Portable::<f64>::new();
    let world = root.world_size();
    let shard = HostMatrix::from_vec(Shape::vector(mine.len()), mine.to_vec()).unwrap();
    let mut all = HostMatrix::zeros(Shape::matrix(1, world * mine.len()));
    root.all_gather(&cpu, &shard, &mut all).unwrap();
    all.as_slice().to_vec()
}

fn rank_main(args: &[String]) {
    let root = MpiGroup::<f64>::init().unwrap();
    match args[0].as_str() {
        "step" => rank_steps(&root, args[1].parse().unwrap(), args[2].parse().unwrap()),
        "collectives" => rank_collectives(&root),
        other => panic!("unknown rank task {other}"),
    }
}

/// Times `steps` steps after a warm-up step; rank 0 prints the phases averaged over ranks.
fn rank_steps(root: &MpiGroup<f64>, steps: usize, round: usize) {
    let (rank, world) = (root.rank(), root.world_size());
    let cpu = Cpu::with_threads(1);
    let specs = specs();
    let mut opt = DistributedOptimizer::new(
        &cpu,
        Timed::new(root.another()),
        specs.clone(),
        HybridConfig::default(),
    )
    .unwrap()
    .with_round_robin_newton_schulz(&cpu, true)
    .unwrap()
    .with_bf16_gather(true);
    let (mut params, grads) = (tensors(&specs, 0), tensors(&specs, 1 + rank));
    *opt.collective().params.borrow_mut() = params.iter().map(|p| p.as_slice().as_ptr() as usize).collect();
    opt.step(&cpu, &mut params, &grads, 1e-3).unwrap();
    // At one rank, a HybridOptimizer on one thread steps in turn with it: a peer in the same
    // conditions.
    let mut single = (world == 1).then(|| {
        let mut opt = HybridOptimizer::new(&cpu, specs.clone(), HybridConfig::default()).unwrap();
        let mut params = tensors(&specs, 0);
        opt.step(&cpu, &mut params, &grads, 1e-3).unwrap();
        (opt, params, Vec::new())
    });
    let traffic_before = opt.collective().inner.traffic();
    // Per step: the time, then its phases.
    let mut times: Vec<Vec<f64>> = Vec::new();
    for _ in 0..steps {
        root.barrier().unwrap();
        opt.collective().reset();
        let start = Instant::now();
        opt.step(&cpu, &mut params, &grads, 1e-3).unwrap();
        let mut step = vec![start.elapsed().as_secs_f64() * 1e3];
        step.extend(opt.collective().times());
        times.push(step);
        if let Some((opt, params, times)) = &mut single {
            let start = Instant::now();
            opt.step(&cpu, params, &grads, 1e-3).unwrap();
            times.push(start.elapsed().as_secs_f64() * 1e3);
        }
    }
    let traffic = opt.collective().inner.traffic();
    let per_step = |after: u64, before: u64| (after - before) / steps as u64;

    // The median step and its own phases (which add up to it, where medians of each would not).
    times.sort_by(|a, b| a[0].total_cmp(&b[0]));
    let mine = times.swap_remove(steps / 2);
    let all = gather_all(root, &mine);
    let mean = |i: usize| (0..world).map(|r| all[r * mine.len() + i]).sum::<f64>() / world as f64;
    let single_ms = single.map_or(0.0, |(_, _, times)| median(times));
    if rank == 0 {
        let (step, rs, ag, bc, pg, ns) = (mean(0), mean(1), mean(2), mean(3), mean(4), mean(5));
        let compute = step - rs - ag - bc - pg - ns;
        println!(
            r#"{{"case":"step","round":{round},"ranks":{world},"step_ms":{step:.2},"compute_ms":{compute:.2},"reduce_scatter_ms":{rs:.2},"all_gather_ms":{ag:.2},"broadcast_ms":{bc:.2},"param_gather_ms":{pg:.2},"newton_schulz_ms":{ns:.2},"single_ms":{single_ms:.2},"reduce_scatter_bytes":{},"all_gather_bytes":{},"broadcast_bytes":{}}}"#,
            per_step(traffic.reduce_scatter, traffic_before.reduce_scatter),
            per_step(traffic.all_gather, traffic_before.all_gather),
            per_step(traffic.broadcast, traffic_before.broadcast),
        );
    }
}

/// Collective sizes timed for the fit: 2^10..2^22 f32 (4 KiB to 16 MiB).
const SIZES: [usize; 7] = [1 << 10, 1 << 12, 1 << 14, 1 << 16, 1 << 18, 1 << 20, 1 << 22];

/// Median times of each collective on vectors of `SIZES`; rank 0 prints them.
fn rank_collectives(root: &MpiGroup<f64>) {
    let group: MpiGroup<f32> = root.another();
    let (rank, world) = (group.rank(), group.world_size());
    let cpu = Cpu::with_threads(1);
    for &n in &SIZES {
        let full_data: Vec<f32> = (0..n).map(|i| (i % 97) as f32).collect();
        let mut full = HostMatrix::from_vec(Shape::vector(n), full_data).unwrap();
        let mut shard = HostMatrix::zeros(Shape::vector(n.div_ceil(world)));
        let reps = (64 << 20) / (n * 4) + 3;
        let reps = reps.min(200);
        let time = |f: &mut dyn FnMut()| {
            f(); // warm-up: staging grows
            let times: Vec<f64> = (0..reps)
                .map(|_| {
                    root.barrier().unwrap();
                    let start = Instant::now();
                    f();
                    start.elapsed().as_secs_f64() * 1e6
                })
                .collect();
            median(times)
        };
        let rs = time(&mut || group.reduce_scatter_mean(&cpu, &full, &mut shard).unwrap());
        let ag = time(&mut || group.all_gather(&cpu, &shard, &mut full).unwrap());
        let bc = time(&mut || Collective::<Cpu>::broadcast(&group, &cpu, 0, &mut full).unwrap());
        if rank == 0 {
            for (kind, us) in [("reduce_scatter", rs), ("all_gather", ag), ("broadcast", bc)] {
                println!(
                    r#"{{"case":"collective","kind":"{kind}","ranks":{world},"elems":{n},"bytes":{},"us":{us:.2}}}"#,
                    n * 4
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Launcher mode.

/// One rank count's `step` line, read back.
struct StepLine {
    ranks: usize,
    fields: Vec<(String, f64)>,
}

impl StepLine {
    fn get(&self, key: &str) -> f64 {
        (self.fields.iter())
            .find(|(k, _)| k == key)
            .map(|(_, v)| *v)
            .unwrap_or_else(|| panic!("no {key}"))
    }
}

/// The numbers of a flat JSON line.
fn numbers(line: &str) -> Vec<(String, f64)> {
    let body = line.trim().trim_start_matches('{').trim_end_matches('}');
    (body.split(','))
        .filter_map(|kv| {
            let (k, v) = kv.split_once(':')?;
            Some((k.trim().trim_matches('"').to_string(), v.trim().parse().ok()?))
        })
        .collect()
}

fn mpirun(ranks: usize, args: &[String]) -> Vec<String> {
    let exe = std::env::current_exe().unwrap();
    let out = Command::new("mpirun")
        .args(["--oversubscribe", "-np", &ranks.to_string()])
        .arg(exe)
        .arg("rank")
        .args(args)
        // Open MPI refuses to run as root without these.
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("mpirun: {e} (install Open MPI: .ci/install-mpi.sh)"));
    assert!(
        out.status.success(),
        "mpirun -np {ranks} {args:?}: {}",
        out.status
    );
    let lines: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    for line in &lines {
        println!("{line}");
    }
    lines
}

/// Least squares `t = a x + b y` over `(x, y, t)`.
fn fit(points: &[(f64, f64, f64)]) -> (f64, f64) {
    let (mut xx, mut xy, mut yy, mut xt, mut yt) = (0.0, 0.0, 0.0, 0.0, 0.0);
    for &(x, y, t) in points {
        // Relative errors: every size counts, not only the largest.
        let w = 1.0 / (t * t);
        xx += w * x * x;
        xy += w * x * y;
        yy += w * y * y;
        xt += w * x * t;
        yt += w * y * t;
    }
    let det = xx * yy - xy * xy;
    ((xt * yy - yt * xy) / det, (yt * xx - xt * xy) / det)
}

/// A collective's model terms at `p` ranks: (messages on the critical path, bytes factor).
fn terms(kind: &str, p: f64) -> (f64, f64) {
    match kind {
        "broadcast" => (p.log2(), p.log2()),
        _ => (p - 1.0, (p - 1.0) / p),
    }
}

/// Seconds of one `kind` collective of `bytes` at `p` ranks under `(alpha, beta)`.
fn model(kind: &str, (alpha, beta): (f64, f64), p: f64, bytes: f64) -> f64 {
    if p <= 1.0 {
        return 0.0;
    }
    let (steps, volume) = terms(kind, p);
    steps * alpha + volume * bytes * beta
}

/// Share of the Newton-Schulz flops of the most loaded rank, with owners assigned as
/// `DistributedOptimizer::with_round_robin_newton_schulz` does (largest first, least loaded).
fn max_ns_share(specs: &[ParamSpec], p: usize) -> f64 {
    let ns = HybridConfig::default().muon.newton_schulz;
    let mut flops: Vec<f64> = (specs.iter())
        .filter(|s| s.optimizer() == OptimizerKind::Muon)
        .map(|s| ns.flops(s.shape))
        .collect();
    flops.sort_by(|a, b| b.total_cmp(a));
    let mut load = vec![0.0f64; p];
    for f in &flops {
        let least = (0..p).min_by(|&a, &b| load[a].total_cmp(&load[b])).unwrap();
        load[least] += f;
    }
    load.iter().cloned().fold(0.0, f64::max) / flops.iter().sum::<f64>()
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    if args.first().map(String::as_str) == Some("rank") {
        return rank_main(&args[1..]);
    }
    let (mut ranks, mut steps, mut rounds) = (vec![1, 2, 4], 5, 2);
    let (mut link_gbps, mut latency_us) = (100.0, 2.0);
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--ranks" => ranks = value.split(',').map(|r| r.parse().unwrap()).collect(),
            "--steps" => steps = value.parse().unwrap(),
            "--rounds" => rounds = value.parse().unwrap(),
            "--link-gbps" => link_gbps = value.parse().unwrap(),
            "--latency-us" => latency_us = value.parse().unwrap(),
            other => panic!("unknown option {other}; see the file's header"),
        }
    }
    let specs = specs();
    let params: usize = specs.iter().map(|s| s.shape.len()).sum();
    eprintln!("mpi bench: {params} parameters; ranks {ranks:?}, {steps} steps, {rounds} rounds");

    let mut last: Vec<StepLine> = Vec::new();
    for round in 0..rounds {
        last.clear();
        for &n in &ranks {
            let lines = mpirun(n, &["step".into(), steps.to_string(), round.to_string()]);
            let line = lines
                .iter()
                .find(|l| l.contains(r#""case":"step""#))
                .expect("a step line");
            last.push(StepLine {
                ranks: n,
                fields: numbers(line),
            });
        }
        let one = last.iter().find(|l| l.ranks == 1).map(|l| l.get("step_ms"));
        for l in &last {
            if let Some(one) = one {
                eprintln!(
                    "round {round}: {} ranks: step {:.1} ms, {:.3}x the 1-rank step",
                    l.ranks,
                    l.get("step_ms"),
                    l.get("step_ms") / one
                );
            }
        }
    }

    // The collectives' costs, fitted over 2 and 4 ranks.
    let mut points: Vec<(String, usize, f64, f64)> = Vec::new();
    for n in [2, 4] {
        for line in mpirun(n, &["collectives".into()]) {
            let f = numbers(&line);
            let get = |k: &str| f.iter().find(|(key, _)| key == k).map(|(_, v)| *v).unwrap();
            let kind = ["reduce_scatter", "all_gather", "broadcast"]
                .into_iter()
                .find(|k| line.contains(&format!(r#""kind":"{k}""#)))
                .unwrap();
            points.push((kind.into(), n, get("bytes"), get("us") * 1e-6));
        }
    }
    let mut fits = Vec::new();
    for kind in ["reduce_scatter", "all_gather", "broadcast"] {
        let data: Vec<(f64, f64, f64)> = (points.iter())
            .filter(|p| p.0 == kind)
            .map(|&(_, n, bytes, t)| {
                let (steps, volume) = terms(kind, n as f64);
                (steps, volume * bytes, t)
            })
            .collect();
        let (alpha, beta) = fit(&data);
        println!(
            r#"{{"case":"fit","kind":"{kind}","alpha_us":{:.2},"beta_ns_per_byte":{:.4},"gb_per_s":{:.2}}}"#,
            alpha * 1e6,
            beta * 1e9,
            1.0 / beta / 1e9
        );
        fits.push((kind, (alpha, beta)));
    }

    // The step at 8-64 ranks from the last round's 1-rank phases.
    let Some(one) = last.iter().find(|l| l.ranks == 1) else {
        eprintln!("no 1-rank run: no projection");
        return;
    };
    let compute_1 = one.get("compute_ms") * 1e-3;
    // At one rank the one owner runs every Newton-Schulz.
    let ns_1 = one.get("newton_schulz_ms") * 1e-3;
    let network = (latency_us * 1e-6, 8.0 / (link_gbps * 1e9));
    let n_params = specs.len() as f64;
    for p in [8usize, 16, 32, 64] {
        let pf = p as f64;
        let comm = |cost: &dyn Fn(&str) -> (f64, f64)| {
            let mut t = [0.0; 4];
            for s in &specs {
                let bytes = 4.0 * s.shape.len() as f64;
                t[0] += model("reduce_scatter", cost("reduce_scatter"), pf, bytes);
                t[3] += model("all_gather", cost("all_gather"), pf, bytes);
                if s.optimizer() == OptimizerKind::Muon {
                    t[1] += model("all_gather", cost("all_gather"), pf, bytes / 2.0);
                    t[2] += model("broadcast", cost("broadcast"), pf, bytes);
                }
            }
            // The gradient norms: one gather of a float per parameter and rank.
            t[1] += model("all_gather", cost("all_gather"), pf, 4.0 * n_params * pf);
            t
        };
        let measured = |k: &str| fits.iter().find(|f| f.0 == k).unwrap().1;
        let assumed = |_: &str| network;
        let compute = compute_1 / pf;
        let ns = ns_1 * max_ns_share(&specs, p);
        for (link, t) in [
            ("this machine", comm(&measured)),
            ("assumed network", comm(&assumed)),
        ] {
            let step = compute + ns + t.iter().sum::<f64>();
            println!(
                r#"{{"case":"projection","ranks":{p},"links":"{link}","step_ms":{:.2},"compute_ms":{:.2},"newton_schulz_ms":{:.2},"reduce_scatter_ms":{:.2},"all_gather_ms":{:.2},"broadcast_ms":{:.2},"param_gather_ms":{:.2},"vs_1_rank":{:.3}}}"#,
                step * 1e3,
                compute * 1e3,
                ns * 1e3,
                t[0] * 1e3,
                t[1] * 1e3,
                t[2] * 1e3,
                t[3] * 1e3,
                step / (one.get("step_ms") * 1e-3)
            );
        }
    }
}
