//! The data-parallel training step over MPI processes: step time and bytes per step at 1, 2
//! and 4 ranks, split into compute (forward + backward), reduce-scatter (the gradients),
//! all-gather (Muon's `N_t`, and the small vectors of norms and per-step values), Newton-Schulz
//! (with the optimizer's element-wise work; round robin, each matrix on one owner rank, whose
//! result the others wait for in the broadcast) and the parameter gather; then a projection
//! to 8-64 ranks from the measured per-message and per-byte costs.
//!
//! ```text
//! cargo bench -p moonlight-ref --features mpi --bench parallel -- [--preset tiny] [--batch 16] [--seq 64] [--steps 10] [--ranks 1,2,4]
//! ```
//!
//! Launched plainly, it runs `mpirun -np N` on itself for each N (oversubscribed, one thread
//! per rank) and prints the table; each rank process (`rank` mode) times `steps` steps after
//! two warm-up steps with the trainer's own pieces (each rank's rows of the global batch, the
//! `DistributedOptimizer` over `MpiGroup`), wrapped in a `Collective` that times each call.
//! The global batch stays `B x T` at every rank count (the trainer's convention), so compute
//! per rank falls as `1/N` and communication per rank does not.
//!
//! The projection. Each collective kind's time is fitted, from a sweep of all-gathers of
//! 1 to 2^20 floats at the largest rank count with a core per rank, as `alpha` per message plus `beta` per byte in a ring
//! (`(N - 1)` messages and `(N - 1)/N` of the bytes per rank); a step at `N` ranks is then
//! compute(1)/N + Newton-Schulz(1)/N (round robin) + the step's collectives under that model
//! with the bytes and message counts measured here. These are one machine's shared-memory
//! costs: on a cluster, put the network's `alpha` and `beta` in the same formula (printed).

use std::cell::Cell;
use std::process::{exit, Command, Stdio};
use std::time::Instant;

use moonlight_ref::config::ModelConfig;
use moonlight_ref::data::{BatchSampler, DataSource, Dataset};
use moonlight_ref::model::Model;
use moonlight_ref::train::parallel::rank_rows;
use moonlight_ref::train::{OptimizerChoice, RunSettings};
use muon_core::{Backend, Collective, DistributedOptimizer, HostMatrix, Result, Shape};
use muon_faer::{Faer, MpiGroup};
use serde::{Deserialize, Serialize};

/// Collective kinds timed apart.
const RS: usize = 0; // reduce-scatter
const AG: usize = 1; // all-gather (N_t, norms)
const BC: usize = 2; // broadcast (round-robin Newton-Schulz results)
const PG: usize = 3; // parameter gather
const KINDS: usize = 4;

/// A collective that times and counts what it passes on. A parameter gather is an
/// all-gather that follows a `copy_shard`: the optimizer takes its slice of a parameter,
/// updates it and gathers it back, and gathers nothing else right after a copy.
struct Timed<C> {
    inner: C,
    after_copy: Cell<bool>,
    seconds: [Cell<f64>; KINDS],
    bytes: [Cell<u64>; KINDS],
    calls: [Cell<u64>; KINDS],
}

impl<C> Timed<C> {
    fn new(inner: C) -> Self {
        Timed {
            inner,
            after_copy: Cell::new(false),
            seconds: Default::default(),
            bytes: Default::default(),
            calls: Default::default(),
        }
    }

    fn time<T>(&self, kind: usize, bytes: usize, f: impl FnOnce() -> T) -> T {
        let start = Instant::now();
        let out = f();
        let k = kind;
        self.seconds[k].set(self.seconds[k].get() + start.elapsed().as_secs_f64());
        self.bytes[k].set(self.bytes[k].get() + bytes as u64);
        self.calls[k].set(self.calls[k].get() + 1);
        self.after_copy.set(false);
        out
    }

    fn reset(&self) {
        for k in 0..KINDS {
            self.seconds[k].set(0.0);
            self.bytes[k].set(0);
            self.calls[k].set(0);
        }
    }
}

impl<B: Backend<Elem = f32, Matrix = HostMatrix<f32>>, C: Collective<B>> Collective<B> for Timed<C> {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world_size(&self) -> usize {
        self.inner.world_size()
    }
    fn reduce_scatter_mean(&self, b: &B, full: &HostMatrix<f32>, shard: &mut HostMatrix<f32>) -> Result<()> {
        self.time(RS, 4 * full.as_slice().len(), || {
            self.inner.reduce_scatter_mean(b, full, shard)
        })
    }
    fn all_gather(&self, b: &B, shard: &HostMatrix<f32>, full: &mut HostMatrix<f32>) -> Result<()> {
        let kind = if self.after_copy.get() { PG } else { AG };
        let n = 4 * full.as_slice().len();
        self.time(kind, n, || self.inner.all_gather(b, shard, full))
    }
    fn copy_shard(&self, b: &B, full: &HostMatrix<f32>, shard: &mut HostMatrix<f32>) -> Result<()> {
        let out = self.inner.copy_shard(b, full, shard);
        self.after_copy.set(true);
        out
    }
    fn broadcast(&self, b: &B, root: usize, full: &mut HostMatrix<f32>) -> Result<()> {
        let n = 4 * full.as_slice().len();
        self.time(BC, n, || self.inner.broadcast(b, root, full))
    }
}

/// What a rank measured, per step (rank 0's line is printed).
#[derive(Serialize, Deserialize, Debug, Clone)]
struct Measured {
    ranks: usize,
    step_ms: f64,
    compute_ms: f64,
    /// Per kind: RS, AG, BC, PG.
    comm_ms: [f64; KINDS],
    bytes: [u64; KINDS],
    calls: [u64; KINDS],
    /// Optimizer time outside the collectives: Newton-Schulz and the element-wise updates.
    newton_schulz_ms: f64,
    /// All-gather sweep: (floats, seconds per call).
    sweep: Vec<(usize, f64)>,
}

struct Args {
    preset: String,
    batch: usize,
    seq: usize,
    steps: usize,
    ranks: Vec<usize>,
}

fn parse(args: &[String]) -> std::result::Result<Args, String> {
    let mut a = Args {
        preset: "tiny".into(),
        batch: 16,
        seq: 64,
        steps: 10,
        ranks: vec![1, 2, 4],
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        let num = |v: &str| {
            v.parse::<usize>()
                .map_err(|_| format!("{flag}: `{v}` is not a count"))
        };
        match flag.as_str() {
            "--preset" => a.preset = value.clone(),
            "--batch" => a.batch = num(value)?,
            "--seq" => a.seq = num(value)?,
            "--steps" => a.steps = num(value)?.max(1),
            "--ranks" => a.ranks = value.split(',').map(num).collect::<std::result::Result<_, _>>()?,
            "--bench" => {}
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    Ok(a)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // `cargo bench` passes `--bench`; drop it.
    let args: Vec<String> = args.into_iter().filter(|a| a != "--bench").collect();
    let result = if args.first().map(String::as_str) == Some("rank") {
        parse(&args[1..]).and_then(|a| rank_main(&a))
    } else {
        parse(&args).and_then(|a| launcher(&a))
    };
    if let Err(e) = result {
        eprintln!("parallel bench: {e}");
        exit(1);
    }
}

/// One rank: `steps` timed steps, then the all-gather sweep; rank 0 prints a JSON line.
fn rank_main(a: &Args) -> std::result::Result<(), String> {
    let s = |e: muon_core::Error| e.to_string();
    let group = MpiGroup::<f32>::init().map_err(s)?;
    let (rank, world) = (group.rank(), group.world_size());
    let sweep_group = group.another::<f32>();
    let cpu = Faer::<f32>::with_threads(1);
    let model_cfg = ModelConfig::preset(&a.preset)?;
    let mut settings = RunSettings::new(&a.preset, model_cfg.clone(), OptimizerChoice::Muon);
    settings.batch = a.batch;
    settings.seq = a.seq;
    let rows = rank_rows(a.batch, world, rank).map_err(|e| e.to_string())?;
    let data =
        Dataset::load(&DataSource::Embedded, a.seq, model_cfg.vocab_size).map_err(|e| e.to_string())?;
    let mut model = Model::new(&cpu, model_cfg, rows.len(), a.seq, 1).map_err(|e| e.to_string())?;
    let specs = settings.optimizer_specs(model.param_specs());
    let mut opt = DistributedOptimizer::new(&cpu, Timed::new(group), specs, settings.hybrid.clone())
        .map_err(s)?
        .with_round_robin_newton_schulz(&cpu, world > 1)
        .map_err(s)?;
    let mut sampler = BatchSampler::new(1, a.batch, a.seq);
    let (mut gx, mut gy) = (vec![0; a.batch * a.seq], vec![0; a.batch * a.seq]);
    let span = rows.start * a.seq..rows.end * a.seq;
    let (mut compute, mut optimizer) = (0.0, 0.0);
    let mut wall = Instant::now();
    for step in 0..a.steps + 2 {
        if step == 2 {
            opt.collective().reset();
            (compute, optimizer) = (0.0, 0.0);
            wall = Instant::now();
        }
        sampler.next_batch(&data.train, &mut gx, &mut gy);
        let t0 = Instant::now();
        model
            .forward(&cpu, &gx[span.clone()], &gy[span.clone()])
            .map_err(|e| e.to_string())?;
        model.backward(&cpu).map_err(|e| e.to_string())?;
        let t1 = Instant::now();
        let (params, grads) = model.params_and_grads();
        opt.step(&cpu, params, grads, 1e-3).map_err(s)?;
        compute += (t1 - t0).as_secs_f64();
        optimizer += t1.elapsed().as_secs_f64();
    }
    let n = a.steps as f64;
    let step_ms = wall.elapsed().as_secs_f64() * 1e3 / n;
    let c = opt.collective();
    let comm: [f64; KINDS] = std::array::from_fn(|k| c.seconds[k].get() * 1e3 / n);
    let comm_total: f64 = comm.iter().sum();
    // The all-gather sweep: per-message and per-byte costs.
    let mut sweep = Vec::new();
    for floats in [1usize, 1 << 10, 1 << 14, 1 << 17, 1 << 20] {
        let shard = HostMatrix::<f32>::zeros(Shape::vector(floats.div_ceil(world)));
        let mut full = HostMatrix::<f32>::zeros(Shape::vector(floats));
        let reps = if floats >= 1 << 17 { 5 } else { 50 };
        Collective::<Faer<f32>>::all_gather(&sweep_group, &cpu, &shard, &mut full).map_err(s)?;
        let t = Instant::now();
        for _ in 0..reps {
            Collective::<Faer<f32>>::all_gather(&sweep_group, &cpu, &shard, &mut full).map_err(s)?;
        }
        sweep.push((floats, t.elapsed().as_secs_f64() / reps as f64));
    }
    if rank == 0 {
        let m = Measured {
            ranks: world,
            step_ms,
            compute_ms: compute * 1e3 / n,
            comm_ms: comm,
            bytes: std::array::from_fn(|k| c.bytes[k].get() / a.steps as u64),
            calls: std::array::from_fn(|k| c.calls[k].get() / a.steps as u64),
            newton_schulz_ms: (optimizer * 1e3 / n - comm_total).max(0.0),
            sweep,
        };
        println!("RESULT {}", serde_json::to_string(&m).map_err(|e| e.to_string())?);
    }
    Ok(())
}

/// Runs every rank count under `mpirun`, prints the table and the projection.
fn launcher(a: &Args) -> std::result::Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut results: Vec<Measured> = Vec::new();
    for &n in &a.ranks {
        let out = Command::new("mpirun")
            .args(["--oversubscribe", "-np", &n.to_string()])
            .arg(&exe)
            .arg("rank")
            .args(["--preset", &a.preset])
            .args(["--batch", &a.batch.to_string(), "--seq", &a.seq.to_string()])
            .args(["--steps", &a.steps.to_string()])
            // One thread per rank: the model's rayon loops too.
            .env("RAYON_NUM_THREADS", "1")
            .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
            .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot start mpirun (install Open MPI): {e}"))?;
        let text = String::from_utf8_lossy(&out.stdout);
        let line = (text.lines().find_map(|l| l.strip_prefix("RESULT "))).ok_or_else(|| {
            format!(
                "-np {n}: no result\n{text}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
        results.push(serde_json::from_str(line).map_err(|e| e.to_string())?);
    }
    println!(
        "preset {}, global batch {} x {}, Muon (round-robin Newton-Schulz), one thread per rank, {} steps; ms per step (rank 0)",
        a.preset, a.batch, a.seq, a.steps
    );
    println!("| ranks | step | compute | reduce-scatter | all-gather | Newton-Schulz | broadcast | param gather | MB/step (RS + AG + BC + PG) |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for m in &results {
        let mb: Vec<String> = m
            .bytes
            .iter()
            .map(|b| format!("{:.2}", *b as f64 / 1e6))
            .collect();
        println!(
            "| {} | {:.1} | {:.1} | {:.2} | {:.2} | {:.1} | {:.2} | {:.2} | {} |",
            m.ranks,
            m.step_ms,
            m.compute_ms,
            m.comm_ms[RS],
            m.comm_ms[AG],
            m.newton_schulz_ms,
            m.comm_ms[BC],
            m.comm_ms[PG],
            mb.join(" + ")
        );
    }
    // alpha, beta from the sweep at the largest rank count above 1 that has a core per rank
    // (an oversubscribed sweep measures the scheduler, not the transport).
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let fits = |m: &&Measured| m.ranks > 1 && m.ranks <= cores.max(2);
    let Some(m) = results.iter().filter(fits).max_by_key(|m| m.ranks) else {
        println!("(no projection: measure at 2 or more ranks)");
        return Ok(());
    };
    let p = m.ranks as f64;
    let (small, large) = (m.sweep[0], *m.sweep.last().unwrap());
    let alpha = small.1 / (p - 1.0);
    let beta = ((large.1 - small.1) / (4.0 * (large.0 - small.0) as f64) * p / (p - 1.0)).max(0.0);
    println!(
        "\nring model from {}-rank all-gathers: alpha = {:.1} us per message, beta = {:.3} ns per byte ({:.2} GB/s)",
        m.ranks,
        alpha * 1e6,
        beta * 1e9,
        1.0 / beta.max(1e-15) / 1e9
    );
    let one = results.iter().find(|m| m.ranks == 1).unwrap_or(&results[0]);
    let scale_compute = one.ranks as f64;
    println!("projection: step(N) = compute(1)/N + Newton-Schulz(1)/N + sum over collectives of calls*(N-1)*alpha + bytes*(N-1)/N*beta");
    println!("| ranks | compute | Newton-Schulz | communication | step (ms) |");
    println!("|---|---|---|---|---|");
    let bytes: u64 = m.bytes.iter().sum();
    let calls: u64 = m.calls.iter().sum();
    for n in [8usize, 16, 32, 64] {
        let nf = n as f64;
        let compute = one.compute_ms * scale_compute / nf;
        let ns = one.newton_schulz_ms * scale_compute / nf;
        let comm = (calls as f64 * (nf - 1.0) * alpha + bytes as f64 * (nf - 1.0) / nf * beta) * 1e3;
        println!(
            "| {n} | {compute:.2} | {ns:.2} | {comm:.2} | {:.2} |",
            compute + ns + comm
        );
    }
    Ok(())
}
