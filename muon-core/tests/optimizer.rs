//! Muon, AdamW and the hybrid optimizer against hand-computed steps, plus errors, state
//! round trips and schedules.

mod common;

use muon_core::LrSchedule;

#[test]
fn warmup_cosine_hits_its_landmarks() {
    let s = LrSchedule::moonlight(10, 110);
    assert!((s.factor(0) - 1.0 / 11.0).abs() < 1e-15);
    assert_eq!(s.factor(10), 1.0);
    // Half-way through the decay the cosine is at the mean of 1 and the floor.
    assert!((s.factor(60) - 0.55).abs() < 1e-12);
    assert!((s.factor(110) - 0.1).abs() < 1e-15);
    assert!((s.factor(10_000) - 0.1).abs() < 1e-15);
    assert!((s.lr(4.2e-4, 110) - 4.2e-5).abs() < 1e-18);
}
