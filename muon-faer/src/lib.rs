//! muon-faer: the CPU backend of muon-rs on faer + rayon (being written; see issue 4).
