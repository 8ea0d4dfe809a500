//! Holds no code: the cross-crate tests live in `tests/tests/` and the no_std proof in
//! `tests/no-std-proof/`. Each crate's own tests live beside it.
