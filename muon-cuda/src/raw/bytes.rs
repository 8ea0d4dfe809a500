//! Device buffers viewed as bytes, for NCCL, which moves bytes without arithmetic (the bf16
//! all-gather of Muon's `N_t`, whose bf16 bits are `u16`s).

use bytemuck::Pod;
use cudarc::driver::{CudaSlice, CudaView, CudaViewMut};
use muon_core::{Error, Result};

fn out_of_range(what: &str, len: usize, available: usize) -> Error {
    Error::Backend(format!(
        "{what}: a byte view of {len} elements of a buffer of {available}"
    ))
}

/// The bytes of the first `len` elements of `x`; an error naming `what` when `x` is shorter.
pub(crate) fn bytes<'a, T: Pod>(what: &str, x: &'a CudaSlice<T>, len: usize) -> Result<CudaView<'a, u8>> {
    let view = len.checked_mul(size_of::<T>()).and_then(|n| {
        // SAFETY: `T: Pod` has no padding and no invalid bit patterns, so each of its bytes
        // is an initialized `u8`; `u8`'s alignment (1) divides `T`'s. cudarc returns `None`
        // unless the `n` bytes lie inside the allocation; the view borrows `x`.
        unsafe { x.transmute::<u8>(n) }
    });
    view.ok_or_else(|| out_of_range(what, len, x.len()))
}

/// The bytes of the first `len` elements of `x`, writable; see [`bytes`].
pub(crate) fn bytes_mut<'a, T: Pod>(
    what: &str,
    x: &'a mut CudaSlice<T>,
    len: usize,
) -> Result<CudaViewMut<'a, u8>> {
    let available = x.len();
    let view = len.checked_mul(size_of::<T>()).and_then(|n| {
        // SAFETY: as in `bytes`; `T: Pod` also makes any bytes written a valid `T`. The view
        // borrows `x` mutably.
        unsafe { x.transmute_mut::<u8>(n) }
    });
    view.ok_or_else(|| out_of_range(what, len, available))
}
