//! The row-wise host ops and the attention core alone, on one layer of `small` at 32 x 128
//! tokens: what the model bench's step is made of, one op at a time.
//!
//! ```text
//! cargo bench -p moonlight-ref --bench ops -- [--threads 1] [--reps 15]
//! ```
//!
//! Prints the median (and fastest) milliseconds of each call: the attention core's forward
//! and backward (MLA: 32 sequences x 6 heads x 128 positions, queries and keys of 48, values
//! of 32, products in bf16 on the unit `Bf16Kernel::detect` names, f32 on a CPU with none),
//! the causal softmax over the layer's 192 x 128 x 128 scores and its backward, and RMSNorm
//! on `[4096, 192]` and its backward. Before each call a pass over 32 MB pushes the operands
//! out of the caches, as the rest of a training step does.

use std::process::exit;
use std::time::Instant;

use moonlight_ref::ops::{AttentionOps, HeadCols, HeadLayout, Qkv, QkvGrads, TokenOps};
use muon_core::{HostMatrix, Precision, Shape};
use muon_faer::Faer;

/// A `[batch, rows, cols]` stack of values in `[lo, lo + 1)` from a fixed sequence.
fn filled(batch: usize, rows: usize, cols: usize, seed: u64, lo: f32) -> HostMatrix<f32> {
    let mut s = seed;
    let data = (0..batch * rows * cols)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            lo + (s >> 40) as f32 / (1u64 << 24) as f32
        })
        .collect();
    HostMatrix::from_vec(Shape::batched(batch, rows, cols), data).expect("sizes match")
}

/// Times `call` `reps` times, each after `prepare` (untimed: restoring the input the call
/// overwrites in `state`) and a pass over `evict`: (median, fastest) ms.
fn time<S>(
    reps: usize,
    evict: &mut [f32],
    state: &mut S,
    mut prepare: impl FnMut(&mut S),
    mut call: impl FnMut(&mut S),
) -> (f64, f64) {
    let mut ms: Vec<f64> = (0..reps)
        .map(|_| {
            prepare(state);
            evict.iter_mut().for_each(|v| *v += 1.0);
            let start = Instant::now();
            call(state);
            start.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    ms.sort_by(f64::total_cmp);
    (ms[ms.len() / 2], ms[0])
}

fn run(threads: usize, reps: usize) -> Result<(), String> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .map_err(|e| e.to_string())?;
    let b = Faer::<f32>::with_threads(threads).with_precision(Precision::Bf16);
    let e = |e: muon_core::Error| e.to_string();
    let mut evict = vec![0.0f32; 8 << 20];
    let show = |what: &str, (median, fastest): (f64, f64)| {
        println!("{what:<34} {median:>7.3} ms (fastest {fastest:.3})");
    };
    println!(
        "one layer of small at 32 x 128 tokens, {threads} thread(s), products on {}",
        b.bf16_kernel().map_or("f32".to_string(), |k| k.to_string())
    );

    // The attention core, MLA's layout.
    let (batch, seq, h, dn, dr, dv, r) = (32, 128, 6, 32, 16, 32, 64);
    let n = batch * seq;
    let layout = HeadLayout {
        heads: h,
        q: HeadCols::new(0, dn + dr, dn + dr),
        k: HeadCols::new(0, dn + dv, dn),
        k_shared: Some(HeadCols::new(r, 0, dr)),
        v: HeadCols::new(dn, dn + dv, dv),
        out: HeadCols::new(0, dv, dv),
    };
    let (q, kvb, kva) = (
        filled(1, n, h * (dn + dr), 1, -0.5),
        filled(1, n, h * (dn + dv), 2, -0.5),
        filled(1, n, r + dr, 3, -0.5),
    );
    let d_out = filled(1, n, h * dv, 4, -0.5);
    let scores = || filled(batch * h, seq, seq, 5, 0.0);
    let (mut probs, mut dprobs) = (scores(), scores());
    let mut keys = filled(batch, seq, 2 * (dn + dr), 6, 0.0);
    let mut out = filled(1, n, h * dv, 7, 0.0);
    let (mut dq, mut dkvb, mut dkva) = (
        filled(1, n, h * (dn + dr), 8, 0.0),
        filled(1, n, h * (dn + dv), 9, 0.0),
        filled(1, n, r + dr, 10, 0.0),
    );
    let x = Qkv {
        q: &q,
        k: &kvb,
        k_shared: Some(&kva),
        v: &kvb,
    };
    let mut failed = None;
    let forward = time(
        reps,
        &mut evict,
        &mut (),
        |_| {},
        |_| {
            if let Err(err) = b.attention_core_forward(&mut probs, &mut keys, &mut out, x, &layout, 0.1) {
                failed = Some(e(err));
            }
        },
    );
    show("attention core forward", forward);
    let backward = time(
        reps,
        &mut evict,
        &mut (),
        |_| {},
        |_| {
            let grads = QkvGrads {
                dq: &mut dq,
                dk: &mut dkvb,
                dk_shared: Some(&mut dkva),
                dv: None,
            };
            if let Err(err) =
                b.attention_core_backward(grads, &mut dprobs, &mut keys, &d_out, &probs, x, &layout, 0.1)
            {
                failed = Some(e(err));
            }
        },
    );
    show("attention core backward", backward);

    // The causal softmax over the same scores (a stack of logits in [-4, 4)).
    let logits = filled(batch * h, seq, seq, 11, -0.5);
    let mut logits8 = logits.clone();
    logits8.as_mut_slice().iter_mut().for_each(|v| *v *= 8.0);
    show(
        "causal softmax forward",
        time(
            reps,
            &mut evict,
            &mut probs,
            |probs| probs.as_mut_slice().copy_from_slice(logits8.as_slice()),
            |probs| {
                if let Err(err) = b.causal_softmax_forward(probs) {
                    failed = Some(e(err));
                }
            },
        ),
    );
    show(
        "causal softmax backward",
        time(
            reps,
            &mut evict,
            &mut dprobs,
            |dprobs| dprobs.as_mut_slice().copy_from_slice(logits.as_slice()),
            |dprobs| {
                if let Err(err) = b.causal_softmax_backward(dprobs, &probs) {
                    failed = Some(e(err));
                }
            },
        ),
    );

    // RMSNorm on the residual's width.
    let c = 192;
    let (xr, dy, gain) = (
        filled(1, n, c, 12, 0.25),
        filled(1, n, c, 13, -0.5),
        filled(1, 1, c, 14, 0.5),
    );
    let (mut y, mut rstd, mut dx, mut dgain) = (
        filled(1, n, c, 15, 0.0),
        filled(1, 1, n, 16, 0.0),
        filled(1, n, c, 17, 0.0),
        filled(1, 1, c, 18, 0.0),
    );
    show(
        "rmsnorm forward",
        time(
            reps,
            &mut evict,
            &mut (),
            |_| {},
            |_| {
                if let Err(err) = b.rmsnorm_forward(&mut y, &mut rstd, &xr, &gain, 1e-5) {
                    failed = Some(e(err));
                }
            },
        ),
    );
    show(
        "rmsnorm backward",
        time(
            reps,
            &mut evict,
            &mut (),
            |_| {},
            |_| {
                if let Err(err) = b.rmsnorm_backward(&mut dx, &mut dgain, &dy, &xr, &gain, &rstd) {
                    failed = Some(e(err));
                }
            },
        ),
    );
    failed.map_or(Ok(()), Err)
}

fn main() {
    // `cargo bench` passes `--bench` to every bench binary.
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let (mut threads, mut reps) = (1, 15);
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it.next().and_then(|v| v.parse::<usize>().ok()).filter(|&v| v > 0);
        match (flag.as_str(), value) {
            ("--threads", Some(v)) => threads = v,
            ("--reps", Some(v)) => reps = v,
            _ => {
                eprintln!("ops bench: {flag}: expected --threads N or --reps N (positive integers)");
                exit(2);
            }
        }
    }
    if let Err(err) = run(threads, reps) {
        eprintln!("ops bench: {err}");
        exit(1);
    }
}
