//! The bf16 product timer (feature `product-timer`): what it records, and that it records
//! only while on. Its own test binary: the timer is global, so no other test may run products
//! beside it.

use muon_core::Transpose;
use muon_faer::{
    start_product_timer, stop_product_timer, Bf16Kernel, Faer, Precision, Stored, StoredMut, Structure,
};

#[test]
fn the_timer_counts_each_shape_and_layout_while_on() {
    // The scalar model of VDPBF16PS runs the same driver on any CPU.
    let cpu = Faer::<f32>::with_threads(1)
        .with_precision(Precision::Bf16)
        .with_bf16_kernel(Bf16Kernel::Avx512Bf16Model)
        .expect("the model runs anywhere");
    let data = |n: usize| (0..n).map(|i| (i % 7) as f32 - 3.0).collect::<Vec<f32>>();
    let (a, b) = (data(40 * 60), data(60 * 50));
    let mut c = vec![0.0f32; 60 * 60];
    let mut product = |m, n, k, ta, tb, structure| {
        let a = Stored::new(
            &a[..m * k],
            if ta == Transpose::No { m } else { k },
            if ta == Transpose::No { k } else { m },
            ta,
        );
        let b = Stored::new(
            &b[..k * n],
            if tb == Transpose::No { k } else { n },
            if tb == Transpose::No { n } else { k },
            tb,
        );
        cpu.product_on_thread(StoredMut::new(&mut c, m, n), a, b, 1.0, false, structure);
    };
    let (no, yes) = (Transpose::No, Transpose::Yes);
    product(20, 30, 40, no, no, Structure::Full); // not recorded: the timer is off
    start_product_timer();
    for _ in 0..3 {
        product(20, 30, 40, no, no, Structure::Full);
    }
    product(20, 30, 40, yes, yes, Structure::Full);
    product(50, 50, 40, no, yes, Structure::LowerC);
    let times = stop_product_timer();
    product(50, 50, 40, no, yes, Structure::LowerC); // not recorded: off again

    let find = |m, a_k_rows, b_k_rows| {
        times
            .iter()
            .find(|t| t.m == m && t.a_k_rows == a_k_rows && t.b_k_rows == b_k_rows)
            .unwrap_or_else(|| panic!("no {m} rows {a_k_rows} {b_k_rows} in {times:?}"))
    };
    assert_eq!(times.len(), 3, "{times:?}");
    // A untransposed has k along its rows; B untransposed (k x n) has k down its columns.
    let plain = find(20, true, false);
    let transposed = find(20, false, true);
    let lower = find(50, true, true);
    assert_eq!((plain.n, plain.k, plain.calls, plain.skipped), (30, 40, 3, false));
    assert_eq!((transposed.calls, transposed.skipped), (1, false));
    assert_eq!((lower.n, lower.k, lower.calls, lower.skipped), (50, 40, 1, true));
    assert_eq!(plain.flops(), 3.0 * 2.0 * 20.0 * 30.0 * 40.0);
    for t in &times {
        assert!(
            t.pack_a + t.pack_b <= t.total,
            "packing inside the product's time: {t:?}"
        );
        assert!(t.pack_a > std::time::Duration::ZERO && t.pack_b > std::time::Duration::ZERO);
    }
    assert!(
        times.windows(2).all(|w| w[0].total >= w[1].total),
        "the most time first: {times:?}"
    );
    start_product_timer();
    assert!(stop_product_timer().is_empty(), "start clears what was recorded");
}
