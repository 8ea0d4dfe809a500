//! Forward + backward throughput of the model on `Faer<f32>` (no optimizer).
//!
//! ```text
//! cargo bench -p moonlight-ref --bench model -- [--preset tiny] [--batch 16] [--seq 64] [--steps 10] [--threads 1]
//! ```
//!
//! Prints tokens/s and the split between forward and backward, first with the model called
//! from the main thread (each rayon loop handed to the pool through its injector queue), then
//! from inside `rayon::scope` (as the training loop and the allocation test run it). Without
//! `--preset`: `tiny` at batch 16 x 64 (10 steps) and `small` at 8 x 256 (3 steps); `--batch`,
//! `--seq` and `--steps` replace those of every run. `--threads` sets both the faer backend's
//! team and rayon's global pool (default: every core the OS grants the process). Each run
//! times `steps` steps after one warm-up step (first touches of every buffer, faer's packing
//! buffers).

use std::process::exit;
use std::time::Instant;

use moonlight_ref::config::ModelConfig;
use moonlight_ref::model::Model;
use muon_faer::Faer;

/// One measured configuration.
struct Run {
    preset: String,
    batch: usize,
    seq: usize,
    steps: usize,
}

/// Prints the figures of one run with `threads` threads.
fn measure(run: &Run, threads: usize) -> Result<(), String> {
    let (batch, seq, steps) = (run.batch, run.seq, run.steps);
    let b = Faer::<f32>::with_threads(threads);
    let cfg = ModelConfig::preset(&run.preset)?;
    let mut model = Model::new(&b, cfg.clone(), batch, seq, 1).map_err(|e| e.to_string())?;
    let n = batch * seq;
    let tokens: Vec<u32> = (0..n).map(|i| ((i * 31 + 5) % cfg.vocab_size) as u32).collect();
    let targets: Vec<u32> = (0..n).map(|i| ((i * 17 + 3) % cfg.vocab_size) as u32).collect();
    let step = |model: &mut Model<Faer<f32>>| -> Result<(f64, f64), String> {
        let t0 = Instant::now();
        let loss = model.forward(&b, &tokens, &targets).map_err(|e| e.to_string())?;
        let t1 = Instant::now();
        model.backward(&b).map_err(|e| e.to_string())?;
        let t2 = Instant::now();
        if !loss.is_finite() {
            return Err(format!("the loss is {loss}"));
        }
        Ok(((t1 - t0).as_secs_f64(), (t2 - t1).as_secs_f64()))
    };
    step(&mut model)?;
    let (mut fwd, mut bwd) = (0.0, 0.0);
    for _ in 0..steps {
        let (f, b) = step(&mut model)?;
        fwd += f;
        bwd += b;
    }
    let per_step = (fwd + bwd) / steps as f64;
    println!(
        "{} B={batch} T={seq} on {} threads: {:.0} tokens/s forward+backward ({:.1} ms/step: forward {:.1}, backward {:.1})",
        run.preset,
        b.threads(),
        n as f64 / per_step,
        per_step * 1e3,
        fwd / steps as f64 * 1e3,
        bwd / steps as f64 * 1e3
    );
    Ok(())
}

/// The runs and the thread count the command line asks for.
fn parse(args: &[String]) -> Result<(Vec<Run>, usize), String> {
    let (mut preset, mut batch, mut seq, mut steps) = (None, None, None, None);
    let mut threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let number = || {
            value
                .parse::<usize>()
                .ok()
                .filter(|&v| v > 0)
                .ok_or_else(|| format!("{flag} {value}: expected a positive integer"))
        };
        match flag.as_str() {
            "--preset" => preset = Some(value.clone()),
            "--batch" => batch = Some(number()?),
            "--seq" => seq = Some(number()?),
            "--steps" => steps = Some(number()?),
            "--threads" => threads = number()?,
            other => return Err(format!("unknown option {other}")),
        }
    }
    let standard = match preset {
        Some(p) => vec![(p, 16, 64, 10)],
        None => vec![("tiny".into(), 16, 64, 10), ("small".into(), 8, 256, 3)],
    };
    let runs = standard
        .into_iter()
        .map(|(preset, b, t, s)| Run {
            preset,
            batch: batch.unwrap_or(b),
            seq: seq.unwrap_or(t),
            steps: steps.unwrap_or(s),
        })
        .collect();
    Ok((runs, threads))
}

fn main() {
    // `cargo bench` passes `--bench` to every bench binary.
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let result = parse(&args).and_then(|(runs, threads)| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build_global()
            .map_err(|e| format!("cannot start {threads} rayon threads: {e}"))?;
        for run in &runs {
            measure(run, threads)?;
        }
        // Inside rayon's pool: no hand-over per parallel loop.
        rayon::scope(|_| {
            runs.iter().try_for_each(|run| {
                print!("inside rayon::scope: ");
                measure(run, threads)
            })
        })
    });
    if let Err(e) = result {
        eprintln!("bench model: {e}\nusage: see the header of moonlight-ref/benches/model.rs");
        exit(2);
    }
}
