//! Index buffers, fill, available memory and the thread warm-up on the host.

use muon_core::{Precision, Real, Result, Transpose};

use super::{check_len, CpuReal, HostBackend, Stored, StoredMut, Structure};
use crate::ops::BaseOps;

impl<B: HostBackend> BaseOps for B {
    type Indices = Vec<u32>;

    fn indices_zeros(&self, len: usize) -> Result<Self::Indices> {
        Ok(vec![0; len])
    }

    fn indices_len(idx: &Self::Indices) -> usize {
        idx.len()
    }

    fn indices_upload(&self, dst: &mut Self::Indices, src: &[u32]) -> Result<()> {
        check_len("indices to upload", dst.len(), src.len())?;
        dst.copy_from_slice(src);
        Ok(())
    }

    fn indices_download(&self, src: &Self::Indices, dst: &mut [u32]) -> Result<()> {
        check_len("index slots to download into", src.len(), dst.len())?;
        dst.copy_from_slice(src);
        Ok(())
    }

    fn available_memory(&self) -> Option<u64> {
        host_available_memory()
    }

    fn in_precision(&self, precision: Precision) -> Result<Self> {
        self.host_in_precision(precision)
    }

    fn product_precision(&self) -> Precision {
        self.host_precision()
    }

    fn warm_up(&self) -> Result<()> {
        warm_up_threads(self);
        Ok(())
    }

    fn fill(&self, dst: &mut Self::Matrix, value: Self::Elem) -> Result<()> {
        dst.as_mut_slice().fill(value);
        Ok(())
    }
}

/// `MemAvailable` of `/proc/meminfo` in bytes (Linux); `None` elsewhere.
fn host_available_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Runs one faer product per element type on every thread of the current rayon pool (the
/// global one outside any pool), and one product in the backend's precision. faer's x86
/// kernels create a thread-local workspace on a thread's first product, and a bf16 backend
/// its pool of packing buffers on its first bf16 product; without this, that allocation
/// falls inside whichever later training step first lands a product on the thread, which
/// under load can be any step.
fn warm_up_threads<B: HostBackend>(backend: &B) {
    fn product<T: CpuReal>() {
        const N: usize = 32; // above faer's small-matrix path, so the x86 kernels run
        let (a, mut c) = ([T::ONE; N * N], [T::ZERO; N * N]);
        let a = Stored::new(&a, N, N, Transpose::No);
        T::matmul(StoredMut::new(&mut c, N, N), a, a, T::ONE, false);
    }
    rayon::broadcast(|_| {
        product::<f32>();
        product::<f64>();
    });
    const N: usize = 32;
    let (a, mut c) = ([B::Elem::ONE; N * N], [B::Elem::ZERO; N * N]);
    let a = Stored::new(&a, N, N, Transpose::No);
    backend.product_on_thread(
        StoredMut::new(&mut c, N, N),
        a,
        a,
        B::Elem::ONE,
        false,
        Structure::Full,
    );
}
