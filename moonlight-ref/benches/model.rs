//! Forward + backward throughput of the model on `Faer<f32>`, with its products in f32 and
//! in bf16 (`--precision`), and the hybrid optimizer's step on the same parameters.
//!
//! ```text
//! cargo bench -p moonlight-ref --bench model -- [--preset tiny] [--batch 32] [--seq 128] [--steps 5] \
//!     [--threads 1] [--precision f32|bf16|both] [--simd baseline|avx2|avx512] [--outside] \
//!     [--product-times]
//! ```
//!
//! Prints tokens/s, the split between forward and backward and the optimizer step's time and
//! share of the whole step, for each precision, then bf16's speed-up over f32. A second line
//! counts the flops of forward + backward and of Newton-Schulz per step (nominal), their rates,
//! and the share the optimizer would have if both ran at the same rate: the floor that the
//! batch size and the model's shape set, whatever the kernels. The model runs
//! inside `rayon::scope` (as the training loop does); `--outside` also runs it from the main
//! thread first (each rayon loop handed to the pool through its injector queue). Without
//! `--preset`: `tiny` and `small` at batch 32 x 128 (4096 tokens, 5 and 3 steps); `--batch`,
//! `--seq` and `--steps` replace those of every run. `--threads` sets both the faer backend's
//! team and rayon's global pool (default: every core the OS grants the process). Each run
//! times `steps` steps after one warm-up step (first touches of every buffer, faer's packing
//! buffers). The bf16 products run on the unit `muon_faer::Bf16Kernel::detect` names (f32 on
//! a CPU with none, which the bench says). `--simd` runs the host ops' loops at that vector
//! width (`moonlight_ref::cpu::set_simd_level`; default: the widest the CPU has), to measure
//! what the width buys: the results are the same bits at every width.
//!
//! `--product-times` (built with `--features product-timer`) then runs `steps` more forward +
//! backward steps with muon-faer's product timer on and prints where the bf16 products spent
//! their time: per shape and operand layout, the calls, milliseconds and nominal GFLOP/s per
//! step, and the share spent packing each operand:
//!
//! ```text
//! cargo bench -p moonlight-ref --features product-timer --bench model -- --preset small \
//!     --batch 32 --seq 128 --threads 1 --steps 4 --precision bf16 --product-times
//! ```

use std::process::exit;
use std::time::Instant;

use moonlight_ref::config::ModelConfig;
use moonlight_ref::cpu::{set_simd_level, simd_level, SimdLevel};
use moonlight_ref::model::Model;
use moonlight_ref::ops::BaseOps;
use moonlight_ref::repro::record::training_flops;
use muon_core::{HybridConfig, HybridOptimizer, OptimizerKind};
use muon_faer::{Bf16Kernel, Faer, Precision};

/// One measured configuration.
struct Run {
    preset: String,
    batch: usize,
    seq: usize,
    steps: usize,
}

/// Prints the figures of one run with `threads` threads; returns the seconds of a forward +
/// backward.
fn measure(run: &Run, threads: usize, precision: Precision, product_times: bool) -> Result<f64, String> {
    let (batch, seq, steps) = (run.batch, run.seq, run.steps);
    let b = Faer::<f32>::with_threads(threads).with_precision(precision);
    b.warm_up().map_err(|e| e.to_string())?;
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
    let config = HybridConfig::default();
    // Newton-Schulz's work per step is fixed while the model's grows with the tokens: at equal
    // rates the optimizer's share would be `ns / (ns + model)`. Both are nominal counts (the
    // backend computes one triangle of S and S S, 2/3 of S's and S S's nominal flops).
    let ns_flops: f64 = model
        .param_specs()
        .iter()
        .filter(|spec| spec.optimizer() == OptimizerKind::Muon)
        .map(|spec| config.muon.newton_schulz.flops(spec.shape))
        .sum();
    let model_flops = training_flops(&cfg, batch, seq, 1);
    let mut optimizer = HybridOptimizer::new(&b, model.param_specs(), config).map_err(|e| e.to_string())?;
    let mut opt_step = |model: &mut Model<Faer<f32>>| -> Result<f64, String> {
        let t0 = Instant::now();
        let (params, grads) = model.params_and_grads();
        optimizer
            .step(&b, params, grads, 1e-3)
            .map_err(|e| e.to_string())?;
        Ok(t0.elapsed().as_secs_f64())
    };
    step(&mut model)?;
    opt_step(&mut model)?;
    let (mut fwd, mut bwd, mut opt) = (0.0, 0.0, 0.0);
    for _ in 0..steps {
        let (f, b) = step(&mut model)?;
        fwd += f;
        bwd += b;
        opt += opt_step(&mut model)?;
    }
    let per_step = (fwd + bwd) / steps as f64;
    if product_times {
        print_product_times(steps, per_step, || step(&mut model).map(|_| ()))?;
    }
    let kernel = b.bf16_kernel().map_or("f32 kernels", Bf16Kernel::name);
    let simd = simd_level();
    println!(
        "{} B={batch} T={seq} {precision} ({kernel}, {simd:?} loops) on {} threads: {:.0} tokens/s forward+backward ({:.1} ms/step: forward {:.1}, backward {:.1}); optimizer {:.1} ms ({:.1}% of the step)",
        run.preset,
        b.threads(),
        n as f64 / per_step,
        per_step * 1e3,
        fwd / steps as f64 * 1e3,
        bwd / steps as f64 * 1e3,
        opt / steps as f64 * 1e3,
        100.0 * opt / (opt + fwd + bwd),
    );
    println!(
        "  flops per step (nominal): forward+backward {:.1} GFLOP at {:.0} GFLOP/s; Newton-Schulz {:.1} GFLOP, {:.0} GFLOP/s over the whole optimizer step; at equal rates the optimizer's share would be {:.1}%",
        model_flops / 1e9,
        model_flops / per_step / 1e9,
        ns_flops / 1e9,
        ns_flops / (opt / steps as f64) / 1e9,
        100.0 * ns_flops / (ns_flops + model_flops),
    );
    Ok(per_step)
}

/// Runs `steps` steps with muon-faer's product timer on and prints a table of its products,
/// the most time first (`per_step`: the seconds of a step without the timer, for scale).
#[cfg(feature = "product-timer")]
fn print_product_times(
    steps: usize,
    per_step: f64,
    mut step: impl FnMut() -> Result<(), String>,
) -> Result<(), String> {
    muon_faer::start_product_timer();
    for _ in 0..steps {
        step()?;
    }
    let times = merge_varying(muon_faer::stop_product_timer());
    let (per, ms) = (steps as f64, |d: std::time::Duration| d.as_secs_f64() * 1e3);
    let total: f64 = times.iter().map(|r| ms(r.timing.total)).sum::<f64>() / per;
    println!(
        "  bf16 products: {total:.1} ms a step of {:.1} (thread time; m x n x k as each call ran, \
         a team's blocks apart; layout: A and op(B)^T stored with k along rows 'r' or down \
         columns 'c'; '*': part skipped, so the GFLOP/s are nominal):",
        per_step * 1e3
    );
    println!(
        "  {:>20} {:>6} {:>9} {:>9} {:>9} {:>7} {:>7}",
        "m x n x k", "layout", "calls", "ms", "GFLOP/s", "pack A", "pack B"
    );
    for Row {
        timing: t,
        flops,
        var_m,
        var_k,
    } in times.iter().take(20)
    {
        let layout = |r| if r { 'r' } else { 'c' };
        let dim = |d: usize, var| if var { "var".to_string() } else { d.to_string() };
        println!(
            "  {:>20} {:>5}{} {:>9.0} {:>9.2} {:>9.0} {:>6.0}% {:>6.0}%",
            format!("{} x {} x {}", dim(t.m, *var_m), t.n, dim(t.k, *var_k)),
            format!("{}{}", layout(t.a_k_rows), layout(t.b_k_rows)),
            if t.skipped { '*' } else { ' ' },
            t.calls as f64 / per,
            ms(t.total) / per,
            flops / t.total.as_secs_f64() / 1e9,
            100.0 * t.pack_a.as_secs_f64() / t.total.as_secs_f64(),
            100.0 * t.pack_b.as_secs_f64() / t.total.as_secs_f64(),
        );
    }
    if times.len() > 20 {
        let rest: f64 = times[20..].iter().map(|r| ms(r.timing.total)).sum::<f64>() / per;
        println!("  ... {} more shapes, {rest:.2} ms a step", times.len() - 20);
    }
    Ok(())
}

/// A row of the product table: one shape's timing, or several merged whose `m` or `k` varies.
#[cfg(feature = "product-timer")]
struct Row {
    timing: muon_faer::ProductTiming,
    flops: f64,
    var_m: bool,
    var_k: bool,
}

/// The timings with the grouped expert GEMMs' shapes merged: those that differ only in `m`
/// (the rows routed to each expert), then, among the others, those that differ only in `k`
/// (their weight gradients); the shared expert's products, of the same `n` and `k` or `m` and
/// `n`, join them. The most time first.
#[cfg(feature = "product-timer")]
fn merge_varying(times: Vec<muon_faer::ProductTiming>) -> Vec<Row> {
    use muon_faer::ProductTiming as T;
    let class = |t: &T| (t.n, t.a_k_rows, t.b_k_rows, t.skipped);
    // Adds `row` to the first of `rows` it matches (`fold` marks the merged one), or appends it.
    let merge = |rows: Vec<Row>, matches: &dyn Fn(&Row, &Row) -> bool, fold: fn(&mut Row)| {
        let mut out: Vec<Row> = Vec::new();
        for row in rows {
            match out.iter_mut().find(|o| matches(o, &row)) {
                Some(o) => {
                    let (t, r) = (&mut o.timing, &row.timing);
                    (t.calls, t.total) = (t.calls + r.calls, t.total + r.total);
                    (t.pack_a, t.pack_b) = (t.pack_a + r.pack_a, t.pack_b + r.pack_b);
                    o.flops += row.flops;
                    fold(o);
                }
                None => out.push(row),
            }
        }
        out
    };
    let rows = times
        .into_iter()
        .map(|timing| Row {
            flops: timing.flops(),
            timing,
            var_m: false,
            var_k: false,
        })
        .collect();
    let same_k = |a: &Row, b: &Row| class(&a.timing) == class(&b.timing) && a.timing.k == b.timing.k;
    let rows = merge(rows, &same_k, |r| r.var_m = true);
    let same_m = |a: &Row, b: &Row| {
        !a.var_m && !b.var_m && class(&a.timing) == class(&b.timing) && a.timing.m == b.timing.m
    };
    let mut rows = merge(rows, &same_m, |r| r.var_k = true);
    rows.sort_by_key(|r| std::cmp::Reverse(r.timing.total));
    rows
}

#[cfg(not(feature = "product-timer"))]
fn print_product_times(_: usize, _: f64, _: impl FnMut() -> Result<(), String>) -> Result<(), String> {
    Err("--product-times needs the bench built with `--features product-timer`".into())
}

/// What the command line asks for.
struct Options {
    runs: Vec<Run>,
    threads: usize,
    precisions: Vec<Precision>,
    simd: Option<SimdLevel>,
    outside: bool,
    product_times: bool,
}

/// The runs, the thread count and the precisions the command line asks for.
fn parse(args: &[String]) -> Result<Options, String> {
    let (mut preset, mut batch, mut seq, mut steps) = (None, None, None, None);
    let mut threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut precisions = vec![Precision::F32, Precision::Bf16];
    let (mut outside, mut product_times) = (false, false);
    let mut simd = None;
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        if flag == "--outside" || flag == "--product-times" {
            *(if flag == "--outside" {
                &mut outside
            } else {
                &mut product_times
            }) = true;
            continue;
        }
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
            "--precision" => {
                precisions = match value.as_str() {
                    "both" => vec![Precision::F32, Precision::Bf16],
                    "f32" => vec![Precision::F32],
                    "bf16" => vec![Precision::Bf16],
                    _ => return Err(format!("--precision {value}: expected f32, bf16 or both")),
                }
            }
            "--simd" => {
                simd = Some(match value.as_str() {
                    "baseline" => SimdLevel::Baseline,
                    "avx2" => SimdLevel::Avx2,
                    "avx512" => SimdLevel::Avx512,
                    _ => return Err(format!("--simd {value}: expected baseline, avx2 or avx512")),
                })
            }
            other => return Err(format!("unknown option {other}")),
        }
    }
    let standard = match preset {
        Some(p) => vec![(p, 32, 128, 5)],
        None => vec![("tiny".into(), 32, 128, 5), ("small".into(), 32, 128, 3)],
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
    Ok(Options {
        runs,
        threads,
        precisions,
        simd,
        outside,
        product_times,
    })
}

fn main() {
    // `cargo bench` passes `--bench` to every bench binary.
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let result = parse(&args).and_then(|o| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(o.threads)
            .build_global()
            .map_err(|e| format!("cannot start {} rayon threads: {e}", o.threads))?;
        if let Some(level) = o.simd {
            set_simd_level(level).map_err(|e| format!("--simd: {e}"))?;
        }
        if Bf16Kernel::detect().is_none() && o.precisions.contains(&Precision::Bf16) {
            println!("this CPU has neither AMX nor AVX512-BF16: bf16 runs its products in f32");
        }
        if o.outside {
            for run in &o.runs {
                for &p in &o.precisions {
                    print!("outside rayon: ");
                    measure(run, o.threads, p, o.product_times)?;
                }
            }
        }
        // Inside rayon's pool: no hand-over per parallel loop.
        rayon::scope(|_| {
            o.runs.iter().try_for_each(|run| {
                let times = o
                    .precisions
                    .iter()
                    .map(|&p| measure(run, o.threads, p, o.product_times))
                    .collect::<Result<Vec<f64>, String>>()?;
                if let [f32_time, bf16_time] = times[..] {
                    println!(
                        "{} B={} T={} on {} threads: bf16 forward+backward {:.2}x f32's speed",
                        run.preset,
                        run.batch,
                        run.seq,
                        o.threads,
                        f32_time / bf16_time
                    );
                }
                Ok(())
            })
        })
    });
    if let Err(e) = result {
        eprintln!("bench model: {e}\nusage: see the header of moonlight-ref/benches/model.rs");
        exit(2);
    }
}
