//! muon-cuda: the GPU backend of muon-rs on cudarc (being written; see issue 6).
