//! `MpiGroup` across processes: this binary launches `mpirun -np N` on itself (`rank` mode),
//! the rank processes write their results as JSON lines, and the launching process compares
//! them with the same runs on `ThreadGroup` threads and on one `HybridOptimizer`, computed
//! here.
//!
//! - Steps on 1, 2 and 4 ranks (4 oversubscribed on this 2-core machine): every-rank and
//!   round-robin Newton-Schulz, `N_t` gathered in f32 and in bf16, f32 and f64. MPI gives
//!   `ThreadGroup`'s bits exactly (the reduce-scatter sums in rank order) and the single-rank
//!   optimizer's values to rounding.
//! - State per rank is `1/N` of the whole; bytes per step as counted are `ThreadGroup`'s, and
//!   Muon moves 1.25x (bf16 `N_t`) / 1.5x (f32) AdamW's ZeRO-1 bytes.
//! - No allocation in a step after the first, in every rank process.
//! - A 4-rank checkpoint resumes on 2 ranks and on 1, step for step.
//! - A rank killed mid-run: the job ends, every process gone, within 30 s, naming the rank. A
//!   rank that stops calling collectives: the others fail with a clear error at their deadline.
//!
//! A plain `main` (`harness = false`): the process is either the launcher or a rank, and the
//! allocation counter is process-wide. Without `mpirun` the launcher skips, saying so, except
//! under `CI=true`, where it fails.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use std::{fs, thread};

use common::{host, max_abs_diff, upload, Rng};
use muon_core::{
    Collective, DistributedOptimizer, HostMatrix, HybridConfig, HybridOptimizer, NewtonSchulz, OptimizerKind,
    OptimizerState, ParamRole, ParamSpec, ParamState, Real, Shape,
};
use muon_faer::{Faer, MpiGroup, ThreadGroup, Traffic};
use serde::{Deserialize, Serialize};

struct Counting;
static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards every call unchanged to the system allocator; only counts allocations.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller upholds `alloc`'s contract, which we pass on.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System.alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: as for `dealloc`, and `new_size` is the caller's to check.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

// ---------------------------------------------------------------------------------------------
// What every run does, on any group.

/// Lengths that do not divide by 2 or 4 (91, 3, 288 = 4 * 72 is the one that does), a
/// 3-vector whose last rank owns nothing over 4 ranks, an expert stack, a tall matrix, AdamW.
fn model() -> Vec<ParamSpec> {
    vec![
        ParamSpec::new("embed", Shape::matrix(20, 6), ParamRole::Embedding),
        ParamSpec::new("wq", Shape::matrix(16, 24), ParamRole::Hidden),
        ParamSpec::new("odd", Shape::matrix(7, 13), ParamRole::Hidden),
        ParamSpec::new("tall", Shape::matrix(24, 10), ParamRole::Hidden),
        ParamSpec::new("experts", Shape::batched(3, 8, 12), ParamRole::Hidden),
        ParamSpec::new("norm", Shape::vector(3), ParamRole::Norm),
    ]
}

/// Matrices only, all for `kind`: the report's accounting of traffic.
fn matrices(kind: OptimizerKind) -> Vec<ParamSpec> {
    [(32, 48), (48, 32), (40, 40)]
        .iter()
        .enumerate()
        .map(|(i, &(r, c))| {
            ParamSpec::new(format!("w{i}"), Shape::matrix(r, c), ParamRole::Hidden).with_optimizer(kind)
        })
        .collect()
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Elem {
    F32,
    F64,
}

/// One configuration of a run.
#[derive(Clone, Copy, Debug)]
struct Setup {
    name: &'static str,
    elem: Elem,
    /// `model()`, or `matrices(kind)`.
    matrices: Option<OptimizerKind>,
    round_robin: bool,
    bf16: bool,
    steps: usize,
}

impl Setup {
    fn specs(&self) -> Vec<ParamSpec> {
        self.matrices.map_or_else(model, matrices)
    }
}

const fn setup(name: &'static str, elem: Elem, round_robin: bool, bf16: bool) -> Setup {
    Setup {
        name,
        elem,
        matrices: None,
        round_robin,
        bf16,
        steps: 4,
    }
}

const fn traffic_setup(name: &'static str, kind: OptimizerKind, bf16: bool) -> Setup {
    Setup {
        name,
        elem: Elem::F32,
        matrices: Some(kind),
        round_robin: false,
        bf16,
        steps: 1,
    }
}

/// Every configuration one `steps` launch runs, in order. The first one's state after
/// `CHECKPOINT_AFTER` steps is the checkpoint the resume runs start from.
const SETUPS: [Setup; 7] = [
    setup("f32", Elem::F32, false, false),
    setup("f32-round-robin", Elem::F32, true, false),
    setup("f32-round-robin-bf16", Elem::F32, true, true),
    setup("f64", Elem::F64, false, false),
    traffic_setup("adamw-matrices", OptimizerKind::AdamW, false),
    traffic_setup("muon-matrices", OptimizerKind::Muon, false),
    traffic_setup("muon-matrices-bf16", OptimizerKind::Muon, true),
];
const CHECKPOINT_AFTER: usize = 2;

fn config() -> HybridConfig {
    let mut config = HybridConfig::default();
    config.muon.newton_schulz = NewtonSchulz::polar_express();
    config
}

const LRS: [f64; 4] = [0.02, 0.015, 0.01, 0.005];

/// The global batch of every step: 4 micro-batches, split evenly over the ranks.
const MICRO_BATCHES: usize = 4;

/// Rank `rank` of `world`'s gradient of parameter `p` at `step`: the mean of its micro-batches'
/// gradients. Whatever the rank count, the mean over ranks is the same global batch's.
fn grad(spec: &ParamSpec, p: usize, step: usize, rank: usize, world: usize) -> Vec<f64> {
    let per = MICRO_BATCHES / world;
    let mut sum = vec![0.0; spec.shape.len()];
    for m in rank * per..(rank + 1) * per {
        let micro = Rng::new((step * 1000 + p * 10 + m) as u64).vec(spec.shape.len());
        sum.iter_mut().zip(micro).for_each(|(s, g)| *s += g);
    }
    sum.iter().map(|s| s / per as f64).collect()
}

fn initial_params(specs: &[ParamSpec]) -> Vec<Vec<f64>> {
    (specs.iter().enumerate())
        .map(|(p, s)| Rng::new(77 + p as u64).vec(s.shape.len()))
        .collect()
}

/// Parameters and optimizer state, as bits of their values widened to f64 (exact for f32).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Checkpoint {
    params: Vec<Vec<u64>>,
    state: OptimizerState<u64>,
}

/// What one rank (or the single optimizer) saw; values as f64 bits, so that equality is
/// equality of bits.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Run {
    setup: String,
    world: usize,
    rank: usize,
    /// The steps taken, as indices into `LRS`.
    first_step: usize,
    /// Per step: every parameter after it.
    params: Vec<Vec<Vec<u64>>>,
    grad_norms: Vec<u64>,
    update_rms: Vec<Vec<u64>>,
    /// After `CHECKPOINT_AFTER` steps, when the run got there.
    checkpoint: Option<Checkpoint>,
    /// At the end.
    state: OptimizerState<u64>,
    state_len: usize,
    /// Reduce-scatter, all-gather, broadcast bytes: the steps, the checkpoint's export if
    /// any, and the final export.
    traffic: [u64; 3],
    ns_share: u64,
    /// Allocations inside the optimizer's steps after the first (and their update-RMS reads).
    allocations_after_warmup: usize,
}

fn bits<T: Real>(values: &[T]) -> Vec<u64> {
    values.iter().map(|v| v.to_f64().to_bits()).collect()
}

fn values(bits: &[u64]) -> Vec<f64> {
    bits.iter().map(|&b| f64::from_bits(b)).collect()
}

fn map_state<A: Copy, B>(state: &OptimizerState<A>, f: impl Fn(A) -> B + Copy) -> OptimizerState<B> {
    OptimizerState {
        step: state.step,
        params: (state.params.iter())
            .map(|p| ParamState {
                name: p.name.clone(),
                shape: p.shape,
                kind: p.kind,
                buffers: (p.buffers.iter())
                    .map(|b| b.iter().map(|&v| f(v)).collect())
                    .collect(),
            })
            .collect(),
    }
}

fn state_bits<T: Real>(state: &OptimizerState<T>) -> OptimizerState<u64> {
    map_state(state, |v| v.to_f64().to_bits())
}

fn state_from_bits<T: Real>(state: &OptimizerState<u64>) -> OptimizerState<T> {
    map_state(state, |b| T::from_f64(f64::from_bits(b)))
}

/// What `drive` needs of either optimizer.
trait Stepper<T: muon_faer::Elem> {
    fn step(&mut self, cpu: &Faer<T>, params: &mut [HostMatrix<T>], grads: &[HostMatrix<T>], lr: f64) -> f64;
    fn rms(&mut self, cpu: &Faer<T>, out: &mut [f64]);
    fn export(&self, cpu: &Faer<T>) -> OptimizerState<T>;
    fn import(&mut self, cpu: &Faer<T>, state: &OptimizerState<T>);
    /// Reduce-scatter, all-gather and broadcast bytes so far (none for one optimizer).
    fn traffic(&self) -> [u64; 3];
}

/// The groups that count their traffic.
trait Counted {
    fn counted(&self) -> Traffic;
}

impl<T: Real> Counted for ThreadGroup<T> {
    fn counted(&self) -> Traffic {
        self.traffic()
    }
}

impl<T> Counted for MpiGroup<T> {
    fn counted(&self) -> Traffic {
        self.traffic()
    }
}

impl<T: muon_faer::Elem, C: Collective<Faer<T>> + Counted> Stepper<T> for DistributedOptimizer<Faer<T>, C> {
    fn step(&mut self, cpu: &Faer<T>, params: &mut [HostMatrix<T>], grads: &[HostMatrix<T>], lr: f64) -> f64 {
        let report = DistributedOptimizer::step(self, cpu, params, grads, lr);
        report
            .unwrap_or_else(|e| panic!("distributed step: {e}"))
            .grad_norm
    }
    fn rms(&mut self, cpu: &Faer<T>, out: &mut [f64]) {
        self.update_rms(cpu, out).unwrap()
    }
    fn export(&self, cpu: &Faer<T>) -> OptimizerState<T> {
        self.export_state(cpu).unwrap()
    }
    fn import(&mut self, cpu: &Faer<T>, state: &OptimizerState<T>) {
        self.import_state(cpu, state).unwrap()
    }
    fn traffic(&self) -> [u64; 3] {
        let t = self.collective().counted();
        [t.reduce_scatter, t.all_gather, t.broadcast]
    }
}

impl<T: muon_faer::Elem> Stepper<T> for HybridOptimizer<Faer<T>> {
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
    fn import(&mut self, cpu: &Faer<T>, state: &OptimizerState<T>) {
        self.import_state(cpu, state).unwrap()
    }
    fn traffic(&self) -> [u64; 3] {
        [0; 3]
    }
}

/// Steps `opt` through `steps` (indices into `LRS`) from `start` or the initial parameters,
/// rank `rank` of `world` feeding its own gradients; records everything but the group's.
fn drive<T: muon_faer::Elem>(
    cpu: &Faer<T>,
    opt: &mut impl Stepper<T>,
    setup: &Setup,
    (rank, world): (usize, usize),
    start: Option<&Checkpoint>,
) -> Run {
    let specs = setup.specs();
    let first_step = start.map_or(0, |c| c.state.step as usize);
    let start_params = match start {
        Some(c) => {
            opt.import(cpu, &state_from_bits(&c.state));
            c.params.iter().map(|p| values(p)).collect()
        }
        None => initial_params(&specs),
    };
    let mut params: Vec<HostMatrix<T>> = (specs.iter().zip(&start_params))
        .map(|(s, p)| upload(cpu, s.shape, p))
        .collect();
    let mut run = Run {
        setup: setup.name.into(),
        world,
        rank,
        first_step,
        params: Vec::new(),
        grad_norms: Vec::new(),
        update_rms: Vec::new(),
        checkpoint: None,
        state: OptimizerState {
            step: 0,
            params: Vec::new(),
        },
        state_len: 0,
        traffic: [0; 3],
        ns_share: 0,
        allocations_after_warmup: 0,
    };
    let mut rms = vec![0.0; specs.len()];
    for (step, &lr) in LRS.iter().enumerate().skip(first_step).take(setup.steps) {
        let grads: Vec<HostMatrix<T>> = (specs.iter().enumerate())
            .map(|(p, s)| upload(cpu, s.shape, &grad(s, p, step, rank, world)))
            .collect();
        let before = ALLOCATIONS.load(Ordering::SeqCst);
        let norm = opt.step(cpu, &mut params, &grads, lr);
        opt.rms(cpu, &mut rms);
        if step > first_step {
            run.allocations_after_warmup += ALLOCATIONS.load(Ordering::SeqCst) - before;
        }
        run.grad_norms.push(norm.to_bits());
        run.update_rms.push(bits(&rms));
        run.params
            .push(params.iter().map(|m| bits(&host(cpu, m))).collect());
        if step + 1 == CHECKPOINT_AFTER && start.is_none() {
            run.checkpoint = Some(Checkpoint {
                params: run.params.last().unwrap().clone(),
                state: state_bits(&opt.export(cpu)),
            });
        }
    }
    run.state = state_bits(&opt.export(cpu));
    // After the last collective: every rank has counted everything (ThreadGroup's counts are
    // the group's, read while another rank may be a collective ahead).
    run.traffic = opt.traffic();
    run
}

/// Rank `group.rank()`'s run of `setup` on `group`.
fn run_rank<T, C>(setup: &Setup, group: C, start: Option<&Checkpoint>) -> Run
where
    T: muon_faer::Elem,
    C: Collective<Faer<T>> + Counted,
{
    let cpu = Faer::<T>::with_threads(1);
    let (rank, world) = (group.rank(), group.world_size());
    let mut opt = DistributedOptimizer::new(&cpu, group, setup.specs(), config())
        .unwrap()
        .with_round_robin_newton_schulz(&cpu, setup.round_robin)
        .unwrap()
        .with_bf16_gather(setup.bf16);
    let mut run = drive(&cpu, &mut opt, setup, (rank, world), start);
    run.state_len = opt.state_len();
    run.ns_share = opt.newton_schulz_share().to_bits();
    run
}

/// The same run on `world` `ThreadGroup` threads.
fn run_threads(setup: &Setup, world: usize, start: Option<&Checkpoint>) -> Vec<Run> {
    match setup.elem {
        Elem::F32 => run_threads_of::<f32>(setup, world, start),
        Elem::F64 => run_threads_of::<f64>(setup, world, start),
    }
}

fn run_threads_of<T: muon_faer::Elem + Send + Sync + 'static>(
    setup: &Setup,
    world: usize,
    start: Option<&Checkpoint>,
) -> Vec<Run> {
    let handles: Vec<_> = (ThreadGroup::<T>::new(world).into_iter())
        .map(|group| {
            let (setup, start) = (*setup, start.cloned());
            thread::spawn(move || run_rank(&setup, group, start.as_ref()))
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

/// The same steps on one `HybridOptimizer` fed the global batch's mean gradient.
fn run_single(setup: &Setup, start: Option<&Checkpoint>) -> Run {
    fn of<T: muon_faer::Elem>(setup: &Setup, start: Option<&Checkpoint>) -> Run {
        let cpu = Faer::<T>::with_threads(1);
        let mut opt = HybridOptimizer::new(&cpu, setup.specs(), config()).unwrap();
        drive(&cpu, &mut opt, setup, (0, 1), start)
    }
    match setup.elem {
        Elem::F32 => of::<f32>(setup, start),
        Elem::F64 => of::<f64>(setup, start),
    }
}

// ---------------------------------------------------------------------------------------------
// Rank mode: `mpi rank TASK DIR [ARGS]`, under mpirun.

fn rank_main(args: &[String]) {
    let (task, dir) = (args[0].as_str(), Path::new(&args[1]));
    // Every run gets a group of its own from this one (the optimizer owns its group), made
    // collectively in the same order on every rank.
    let root = MpiGroup::<f32>::init().unwrap_or_else(|e| panic!("MPI: {e}"));
    let rank = root.rank();
    let run = |setup: &Setup, start: Option<&Checkpoint>| match setup.elem {
        Elem::F32 => run_rank(setup, root.another::<f32>(), start),
        Elem::F64 => run_rank(setup, root.another::<f64>(), start),
    };
    match task {
        // Every setup from the start.
        "steps" => {
            let lines: Vec<String> = (SETUPS.iter())
                .map(|setup| serde_json::to_string(&run(setup, None)).unwrap())
                .collect();
            write(&dir.join(format!("steps-{rank}.jsonl")), &lines.join("\n"));
        }
        // The first setup's last steps, from the checkpoint in `checkpoint.json`.
        "resume" => {
            let checkpoint: Checkpoint = serde_json::from_slice(&read(&dir.join("checkpoint.json"))).unwrap();
            let setup = resumed_setup();
            let line = serde_json::to_string(&run(&setup, Some(&checkpoint))).unwrap();
            write(&dir.join(format!("resume-{rank}.jsonl")), &line);
        }
        // Steps until killed (for a minute at most), each rank writing `PID STEP` before each.
        "until-killed" => {
            let progress = dir.join(format!("progress-{rank}"));
            let (pid, start) = (std::process::id(), Instant::now());
            let stepped = step_on(root.another(), usize::MAX, |step| {
                write(&progress, &format!("{pid} {step}"));
                start.elapsed() < Duration::from_secs(60)
            });
            stepped.unwrap_or_else(|e| panic!("rank {rank}: {e}"));
        }
        // Rank 1 leaves after one step; the others' next collective must fail at its deadline.
        "one-leaves" => {
            let group = root.another().with_timeout(Duration::from_secs(LEAVE_DEADLINE_S));
            let stepped = step_on(group, 3, |step| {
                let stay = rank != 1 || step == 0;
                if !stay {
                    eprintln!("rank 1: leaving after one step");
                }
                stay
            });
            if let Err(e) = stepped {
                eprintln!("rank {rank}: {e}");
                std::process::exit(3);
            }
            // Rank 1 drops its groups here: MPI_Finalize, which waits for the others.
        }
        _ => panic!("unknown rank task {task}"),
    }
}

/// The first setup's model stepped on `group` until `steps` steps or `go_on(step)` (called
/// before each) says no, learning rates cycling; the first error, after which the broken group
/// aborts the job when dropped (here, unless the caller exits first).
fn step_on(
    group: MpiGroup<f32>,
    steps: usize,
    mut go_on: impl FnMut(usize) -> bool,
) -> muon_core::Result<()> {
    let (rank, world) = (group.rank(), group.world_size());
    let specs = model();
    let cpu = Faer::<f32>::with_threads(1);
    let mut opt = DistributedOptimizer::new(&cpu, group, specs.clone(), config())?;
    let mut params: Vec<HostMatrix<f32>> = (specs.iter().zip(initial_params(&specs)))
        .map(|(s, p)| upload(&cpu, s.shape, &p))
        .collect();
    let grads: Vec<HostMatrix<f32>> = (specs.iter().enumerate())
        .map(|(p, s)| upload(&cpu, s.shape, &grad(s, p, 0, rank, world)))
        .collect();
    for step in 0..steps {
        if !go_on(step) {
            break;
        }
        if let Err(e) = opt.step(&cpu, &mut params, &grads, LRS[step % LRS.len()]) {
            eprintln!("rank {rank}: step {step} failed: {e}");
            drop(opt); // a broken group aborts the job here
            return Err(e);
        }
    }
    Ok(())
}

/// The first setup's steps after `CHECKPOINT_AFTER`.
fn resumed_setup() -> Setup {
    let mut setup = SETUPS[0];
    setup.steps -= CHECKPOINT_AFTER;
    setup
}

const LEAVE_DEADLINE_S: u64 = 3;

fn write(path: &Path, text: &str) {
    fs::write(path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()))
}

fn read(path: &Path) -> Vec<u8> {
    fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

// ---------------------------------------------------------------------------------------------
// Launcher mode: the checks.

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("rank") {
        rank_main(&args[1..]);
        return;
    }
    if !mpirun_present() {
        let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
        let why = "mpirun not found: install Open MPI (Debian: openmpi-bin libopenmpi-dev; \
                   .ci/install-mpi.sh does)";
        assert!(!ci, "mpi: {why}");
        println!("mpi: skipped, {why}");
        return;
    }
    let dir = std::env::temp_dir().join(format!("muon-faer-mpi-{}", std::process::id()));
    let _cleanup = RemoveOnDrop(dir.clone());
    let mpi = Mpi::new(&dir);
    let mut passed = 0;
    let mut check = |name: &str, f: &mut dyn FnMut()| {
        let start = Instant::now();
        f();
        println!("test {name} ... ok ({:.1} s)", start.elapsed().as_secs_f64());
        passed += 1;
    };
    let mut four_ranks = Vec::new();
    check(
        "mpi_steps_are_threadgroups_bits_and_the_single_optimizers_values",
        &mut || {
            four_ranks = steps_on_1_2_and_4_ranks(&mpi);
        },
    );
    check("a_4_rank_checkpoint_resumes_on_2_ranks_and_on_1", &mut || {
        resume_on_2_and_1(&mpi, &four_ranks)
    });
    check("a_killed_rank_ends_the_job_within_30_s", &mut || {
        killed_rank(&mpi)
    });
    check(
        "a_rank_that_leaves_fails_the_others_at_their_deadline",
        &mut || one_leaves(&mpi),
    );
    println!("mpi: {passed} passed, 0 failed");
}

/// Removes the launches' files when the launcher ends, passing or failing, unless
/// `MUON_MPI_KEEP` is set (to read them after a failure).
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if std::env::var_os("MUON_MPI_KEEP").is_none() {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
}

fn mpirun_present() -> bool {
    Command::new("mpirun")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Launches this binary's rank mode under `mpirun`.
struct Mpi {
    exe: PathBuf,
    dir: PathBuf,
}

/// A launch's exit status and output, read back from its files.
struct Launch {
    status: Option<ExitStatus>,
    elapsed: Duration,
    output: String,
}

impl Mpi {
    fn new(dir: &Path) -> Mpi {
        Mpi {
            exe: std::env::current_exe().unwrap(),
            dir: dir.to_path_buf(),
        }
    }

    /// A fresh directory for one launch's files.
    fn task_dir(&self, name: &str) -> PathBuf {
        let dir = self.dir.join(name);
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// `mpirun -np ranks` of rank task `task` in `dir`, started; output to `dir/mpirun.log`.
    fn spawn(&self, ranks: usize, task: &str, dir: &Path) -> Job {
        let log = fs::File::create(dir.join("mpirun.log")).unwrap();
        let child = Command::new("mpirun")
            .args(["--oversubscribe", "-np", &ranks.to_string()])
            .arg(&self.exe)
            .args(["rank", task])
            .arg(dir)
            // Open MPI refuses to run as root without these (CI runs as root).
            .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
            .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting mpirun: {e}"));
        Job {
            child,
            log: dir.join("mpirun.log"),
        }
    }

    /// Runs rank task `task` on `ranks` ranks to success; returns each rank's JSON lines.
    fn run(&self, ranks: usize, task: &str, prefix: &str, dir: &Path) -> Vec<Vec<Run>> {
        let launch = self.spawn(ranks, task, dir).wait(Duration::from_secs(300));
        assert!(
            launch.status.is_some_and(|s| s.success()),
            "mpirun -np {ranks} {task}: {:?} after {:.1} s\n{}",
            launch.status,
            launch.elapsed.as_secs_f64(),
            launch.output
        );
        (0..ranks)
            .map(|r| {
                let text = read(&dir.join(format!("{prefix}-{r}.jsonl")));
                (String::from_utf8(text).unwrap().lines())
                    .map(|line| serde_json::from_str(line).unwrap())
                    .collect()
            })
            .collect()
    }
}

/// A running `mpirun`, ended (SIGTERM, which it passes on to its ranks, then SIGKILL) if it
/// is dropped still running: a failed check leaves no job behind.
struct Job {
    child: std::process::Child,
    log: PathBuf,
}

impl Job {
    fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Waits up to `limit`; the exit status (`None`: still running then, so ended).
    fn wait(mut self, limit: Duration) -> Launch {
        let start = Instant::now();
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break Some(status);
            }
            if start.elapsed() > limit {
                break None;
            }
            thread::sleep(Duration::from_millis(20));
        };
        let elapsed = start.elapsed();
        let _ = self.end();
        Launch {
            status,
            elapsed,
            output: String::from_utf8_lossy(&read(&self.log)).into_owned(),
        }
    }

    /// Ends the job if it still runs.
    fn end(&mut self) -> std::io::Result<()> {
        if !self.running() {
            return Ok(());
        }
        Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()?;
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.running() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill(); // gone by now, or past SIGTERM
        self.child.wait().map(drop)
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        let _ = self.end();
    }
}

/// Asserts that `mpi` and `threads` saw the same bits everywhere.
fn assert_same_bits(what: &str, mpi: &Run, threads: &Run) {
    let same = [
        ("parameters", mpi.params == threads.params),
        ("gradient norms", mpi.grad_norms == threads.grad_norms),
        ("update RMS", mpi.update_rms == threads.update_rms),
        ("checkpoint", mpi.checkpoint == threads.checkpoint),
        ("final state", mpi.state == threads.state),
        ("state length", mpi.state_len == threads.state_len),
        ("traffic", mpi.traffic == threads.traffic),
        ("Newton-Schulz share", mpi.ns_share == threads.ns_share),
    ];
    for (field, same) in same {
        assert!(same, "{what}: {field} differ from ThreadGroup's");
    }
}

/// Largest difference between two runs' common steps (`b` may have started earlier), over
/// every parameter after every step, every update RMS, the final state, and the gradient norms
/// relative to the first (all values are O(1)).
fn worst_difference(a: &Run, b: &Run) -> f64 {
    let skip = a.first_step - b.first_step;
    let mut worst: f64 = 0.0;
    for (pa, pb) in a.params.iter().zip(&b.params[skip..]) {
        for (x, y) in pa.iter().zip(pb) {
            worst = worst.max(max_abs_diff(&values(x), &values(y)));
        }
    }
    for (x, y) in a.update_rms.iter().zip(&b.update_rms[skip..]) {
        worst = worst.max(max_abs_diff(&values(x), &values(y)));
    }
    let (na, nb) = (values(&a.grad_norms), values(&b.grad_norms[skip..]));
    worst = worst.max(max_abs_diff(&na, &nb[..na.len()]) / na[0]);
    assert_eq!(a.state.step, b.state.step);
    for (sa, sb) in a.state.params.iter().zip(&b.state.params) {
        assert_eq!((&sa.name, sa.kind), (&sb.name, sb.kind));
        for (x, y) in sa.buffers.iter().zip(&sb.buffers) {
            worst = worst.max(max_abs_diff(&values(x), &values(y)));
        }
    }
    worst
}

/// How far a distributed run may be from the single optimizer's: each rank's gradient is the
/// mean of its micro-batches rounded to the element type, and the group averages those, where
/// the single optimizer gets the whole batch's mean rounded once: a few roundings apart (1e-7
/// relative in f32, 1e-16 in f64). The rest of the step is the same operations on the same
/// values (tests/distributed.rs), Newton-Schulz amplifies an input difference by O(10) and the
/// norms sum ~1e3 terms: 1e-5 in f32 and 1e-12 in f64, as in tests/distributed.rs.
fn bound(elem: Elem) -> f64 {
    match elem {
        Elem::F32 => 1e-5,
        Elem::F64 => 1e-12,
    }
}

/// Every setup on 1, 2 and 4 ranks: MPI gives ThreadGroup's bits, the single optimizer's
/// values to rounding, state and traffic per rank as expected, no allocation after warm-up.
/// Returns the 4-rank runs.
fn steps_on_1_2_and_4_ranks(mpi: &Mpi) -> Vec<Vec<Run>> {
    let singles: Vec<Run> = SETUPS.iter().map(|s| run_single(s, None)).collect();
    let mut four = Vec::new();
    for world in [1, 2, 4] {
        let dir = mpi.task_dir(&format!("steps-{world}"));
        let ranks = mpi.run(world, "steps", "steps", &dir);
        for (i, setup) in SETUPS.iter().enumerate() {
            let threads = run_threads(setup, world, None);
            for (rank, runs) in ranks.iter().enumerate() {
                let run = &runs[i];
                let what = format!("{}, rank {rank} of {world}", setup.name);
                assert_eq!(
                    (run.setup.as_str(), run.world, run.rank),
                    (setup.name, world, rank)
                );
                assert_same_bits(&what, run, &threads[rank]);
                assert_eq!(
                    run.allocations_after_warmup, 0,
                    "{what}: steps after the first allocated"
                );
                // The bf16 gather rounds N_t where the single optimizer does not; its bound is
                // tested on ThreadGroup (tests/distributed.rs), whose bits these are.
                if !setup.bf16 {
                    let worst = worst_difference(run, &singles[i]);
                    assert!(
                        worst <= bound(setup.elem),
                        "{what}: differs from the single optimizer by {worst:e}"
                    );
                }
            }
            check_state_share(
                setup,
                world,
                &ranks.iter().map(|r| r[i].clone()).collect::<Vec<_>>(),
            );
        }
        check_traffic_ratios(world, &ranks[0]);
        if world == 4 {
            four = (0..SETUPS.len())
                .map(|i| ranks.iter().map(|r| r[i].clone()).collect())
                .collect();
        }
    }
    four
}

/// The report: optimizer memory per rank is 1/world of the whole (a shard rounds up: at most
/// one element more per buffer), and the shards cover it.
fn check_state_share(setup: &Setup, world: usize, ranks: &[Run]) {
    let specs = setup.specs();
    let whole: usize = (specs.iter())
        .map(|s| match s.optimizer() {
            OptimizerKind::Muon => s.shape.len(),
            OptimizerKind::AdamW => 2 * s.shape.len(),
        })
        .sum();
    let buffers: usize = (specs.iter())
        .map(|s| match s.optimizer() {
            OptimizerKind::Muon => 1,
            OptimizerKind::AdamW => 2,
        })
        .sum();
    let ideal = whole as f64 / world as f64;
    for run in ranks {
        let len = run.state_len as f64;
        assert!(
            len >= ideal && len < ideal + buffers as f64,
            "{}, {world} ranks: {} elements of state on rank {}, the whole is {whole}",
            setup.name,
            run.state_len,
            run.rank
        );
    }
}

/// The report: Distributed Muon moves 1 to 1.25x AdamW's ZeRO-1 bytes. Per step and element,
/// AdamW reduce-scatters the f32 gradient (4 bytes) and all-gathers the parameter (4); Muon
/// also gathers N_t, 2 bytes in bf16 (1.25x) or 4 in f32 (1.5x). The two small vectors of
/// norms per step (a float per parameter and rank) add 0.2-0.4% on this model.
fn check_traffic_ratios(world: usize, runs: &[Run]) {
    let total = |name: &str| {
        let run = runs.iter().find(|r| r.setup == name).unwrap();
        assert!(run.checkpoint.is_none());
        // Less the final export: an all-gather of every f32 state buffer.
        let export: usize = (run.state.params.iter())
            .map(|p| 4 * p.buffers.len() * p.shape.len())
            .sum();
        (run.traffic[0] + run.traffic[1] + run.traffic[2] - export as u64) as f64
    };
    let adamw = total("adamw-matrices");
    let (bf16, f32) = (
        total("muon-matrices-bf16") / adamw,
        total("muon-matrices") / adamw,
    );
    println!("  {world} ranks: bytes per step vs AdamW's: Muon, N_t in bf16 {bf16:.4}x, in f32 {f32:.4}x");
    if world > 1 {
        assert!(
            (bf16 - 1.25).abs() < 5e-3,
            "{world} ranks, bf16 N_t: {bf16}x AdamW's bytes"
        );
        assert!(
            (f32 - 1.5).abs() < 5e-3,
            "{world} ranks, f32 N_t: {f32}x AdamW's bytes"
        );
    }
}

/// The 4-rank run's state after `CHECKPOINT_AFTER` steps resumes on 2 ranks and on 1: the
/// same bits as ThreadGroup resumed alike, and the 4-rank run's own later steps (the same
/// global batches) to rounding.
fn resume_on_2_and_1(mpi: &Mpi, four: &[Vec<Run>]) {
    let uninterrupted = &four[0];
    let checkpoint = uninterrupted[0]
        .checkpoint
        .clone()
        .expect("a checkpoint on rank 0");
    for run in uninterrupted {
        assert_eq!(
            run.checkpoint.as_ref(),
            Some(&checkpoint),
            "rank {}'s checkpoint",
            run.rank
        );
    }
    let setup = resumed_setup();
    let single = run_single(&setup, Some(&checkpoint));
    for world in [2, 1] {
        let dir = mpi.task_dir(&format!("resume-{world}"));
        write(
            &dir.join("checkpoint.json"),
            &serde_json::to_string(&checkpoint).unwrap(),
        );
        let ranks = mpi.run(world, "resume", "resume", &dir);
        let threads = run_threads(&setup, world, Some(&checkpoint));
        for (rank, runs) in ranks.iter().enumerate() {
            let (run, what) = (&runs[0], format!("resumed on rank {rank} of {world}"));
            assert_eq!(run.first_step, CHECKPOINT_AFTER);
            assert_eq!(run.params.len(), setup.steps);
            assert_same_bits(&what, run, &threads[rank]);
            for (reference, of) in [(&uninterrupted[0], "the 4-rank run"), (&single, "one optimizer")] {
                let worst = worst_difference(run, reference);
                assert!(
                    worst <= bound(setup.elem),
                    "{what}: differs from {of} by {worst:e}"
                );
            }
        }
    }
}

/// Rank 1 of a 2-rank job is killed (SIGKILL) mid-run: mpirun ends the job, non-zero, every
/// rank process gone, within 30 s, its output naming the killed rank.
fn killed_rank(mpi: &Mpi) {
    let dir = mpi.task_dir("killed");
    let mut job = mpi.spawn(2, "until-killed", &dir);
    let progress = |rank: usize| -> Option<(u32, usize)> {
        let text = fs::read_to_string(dir.join(format!("progress-{rank}"))).ok()?;
        let (pid, step) = text.split_once(' ')?;
        Some((pid.parse().ok()?, step.parse().ok()?))
    };
    let start = Instant::now();
    let (pids, step) = loop {
        if let (Some((p0, _)), Some((p1, s1))) = (progress(0), progress(1)) {
            if s1 >= 3 {
                break ([p0, p1], s1);
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(120) && job.running(),
            "the ranks did not get to step 3"
        );
        thread::sleep(Duration::from_millis(20));
    };
    let killed = Command::new("kill")
        .args(["-KILL", &pids[1].to_string()])
        .status();
    assert!(killed.is_ok_and(|s| s.success()), "kill -KILL {}", pids[1]);
    let launch = job.wait(Duration::from_secs(30));
    let status = launch.status.unwrap_or_else(|| {
        panic!(
            "the job was still running 30 s after rank 1 died\n{}",
            launch.output
        )
    });
    println!(
        "  rank 1 killed at step {step}: mpirun exited ({status}) after {:.2} s",
        launch.elapsed.as_secs_f64()
    );
    assert!(!status.success(), "mpirun succeeded after a rank was killed");
    assert!(
        launch.output.contains("rank 1") && launch.output.contains("signal 9"),
        "mpirun's output does not name the killed rank:\n{}",
        launch.output
    );
    // Rank 0 is gone too (mpirun reaps its ranks before it exits; give the OS a moment).
    let alive = Path::new("/proc").join(pids[0].to_string());
    let gone_by = Instant::now() + Duration::from_secs(5);
    while alive.exists() && Instant::now() < gone_by {
        thread::sleep(Duration::from_millis(20));
    }
    assert!(!alive.exists(), "rank 0 (pid {}) outlived the job", pids[0]);
}

/// Rank 1 of a 2-rank job returns after one step without a word (and sits in MPI_Finalize):
/// rank 0's next collective fails at its deadline, with a clear error, and the job ends.
fn one_leaves(mpi: &Mpi) {
    let dir = mpi.task_dir("one-leaves");
    let launch = mpi.spawn(2, "one-leaves", &dir).wait(Duration::from_secs(30));
    let status = launch.status.unwrap_or_else(|| {
        panic!(
            "the job was still running 30 s after it started\n{}",
            launch.output
        )
    });
    println!(
        "  rank 1 left after one step: mpirun exited ({status}) after {:.2} s",
        launch.elapsed.as_secs_f64()
    );
    assert!(!status.success(), "mpirun succeeded although rank 1 left early");
    let expected =
        format!("rank 0 of 2: reduce-scatter: the other ranks did not join within {LEAVE_DEADLINE_S}");
    assert!(
        launch.output.contains(&expected) && launch.output.contains("aborting the job"),
        "rank 0 did not report the missing rank as expected ({expected:?}):\n{}",
        launch.output
    );
    assert!(
        launch.elapsed >= Duration::from_secs(LEAVE_DEADLINE_S),
        "the job ended before the deadline"
    );
}
