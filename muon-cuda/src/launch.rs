//! What a kernel launch takes: a grid ([`LaunchConfig`], [`grid_stride`] for the usual one)
//! and an argument list ([`KernelArgs`]). The same in a build without the `cuda` feature, so
//! code that launches its own kernels compiles either way.

#[cfg(feature = "cuda")]
use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, LaunchArgs, PushKernelArg};

/// The grid of a kernel launch: blocks per grid and threads per block in `x`, `y`, `z`, and
/// the bytes of dynamic shared memory per block. cudarc's type in the `cuda` build.
#[cfg(feature = "cuda")]
pub use cudarc::driver::LaunchConfig;

/// The grid of a kernel launch: blocks per grid and threads per block in `x`, `y`, `z`, and
/// the bytes of dynamic shared memory per block (cudarc's `LaunchConfig` in the `cuda` build,
/// with the same fields).
#[cfg(not(feature = "cuda"))]
#[derive(Clone, Copy, Debug)]
pub struct LaunchConfig {
    /// Blocks of the grid, `(x, y, z)`.
    pub grid_dim: (u32, u32, u32),
    /// Threads of a block, `(x, y, z)`.
    pub block_dim: (u32, u32, u32),
    /// Dynamic shared memory per block, in bytes.
    pub shared_mem_bytes: u32,
}

/// Threads per block of a [`grid_stride`] launch.
pub const GRID_STRIDE_THREADS: u32 = 256;

/// Most blocks of a [`grid_stride`] launch: 8192 blocks of 256 threads fill any current GPU,
/// and the kernel's loop covers the elements beyond.
pub const GRID_STRIDE_MAX_BLOCKS: u32 = 8192;

/// The grid for a grid-stride kernel over `n` elements, one that walks
/// `for (i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)` and
/// so is correct on any grid: [`GRID_STRIDE_THREADS`] threads per block, one element per
/// thread up to [`GRID_STRIDE_MAX_BLOCKS`] blocks, and at least one block (a launch needs
/// one; the loop does nothing when `n` is 0). The backend's own elementwise kernels launch on
/// it.
///
/// ```
/// let config = muon_cuda::grid_stride(1000);
/// assert_eq!(config.grid_dim, (4, 1, 1)); // 4 blocks of 256 threads cover 1000 elements
/// assert_eq!(config.block_dim, (256, 1, 1));
/// assert_eq!(muon_cuda::grid_stride(0).grid_dim, (1, 1, 1));
/// assert_eq!(muon_cuda::grid_stride(1 << 40).grid_dim, (8192, 1, 1));
/// ```
pub fn grid_stride(n: usize) -> LaunchConfig {
    let blocks = n
        .div_ceil(GRID_STRIDE_THREADS as usize)
        .clamp(1, GRID_STRIDE_MAX_BLOCKS as usize);
    LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (GRID_STRIDE_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

pub(crate) mod sealed {
    /// Keeps [`KernelArg`](super::KernelArg) and [`KernelArgs`](super::KernelArgs) to the
    /// types of this crate's choice: those below and `CudaMatrix` (next to its definition).
    pub trait Sealed {}
}

/// One argument of a kernel launch, as the kernel receives it.
///
/// - A device buffer by reference is passed as its device pointer (`T*`): a
///   [`CudaMatrix`](crate::CudaMatrix) (`float*`), and in the `cuda` build cudarc's `CudaSlice<T>`, `CudaView`
///   and `CudaViewMut`. Pass `&mut` for a buffer the kernel writes.
/// - A scalar by reference is passed by value: `&f32` for `float`, `&f64` for `double`,
///   `&i32` for `int`, `&i64` for `long long`, `&u32` for `unsigned int`, and so on (`bool`,
///   the 8- to 64-bit integers, `f32`, `f64`).
///
/// Other argument types (a `#[repr(C)]` struct by value) go through cudarc's launch builder
/// and `CudaKernel::function` (in the `cuda` build).
pub trait KernelArg<'a>: sealed::Sealed {
    /// Pushes the argument onto cudarc's launch builder.
    #[cfg(feature = "cuda")]
    #[doc(hidden)]
    fn push(self, builder: &mut LaunchArgs<'a>);
}

/// A kernel's argument list: a tuple of up to 12 [`KernelArg`]s in the order of the kernel's
/// parameters, `(x,)` for one and `()` for none.
pub trait KernelArgs<'a>: sealed::Sealed {
    /// Pushes the arguments onto cudarc's launch builder, first to last.
    #[cfg(feature = "cuda")]
    #[doc(hidden)]
    fn push_all(self, builder: &mut LaunchArgs<'a>);
}

macro_rules! scalar_args {
    ($($t:ty),+) => {$(
        impl sealed::Sealed for &$t {}
        impl<'a> KernelArg<'a> for &'a $t {
            #[cfg(feature = "cuda")]
            fn push(self, builder: &mut LaunchArgs<'a>) {
                builder.arg(self);
            }
        }
    )+};
}
scalar_args!(bool, i8, i16, i32, i64, u8, u16, u32, u64, f32, f64);

#[cfg(feature = "cuda")]
mod cudarc_args {
    use super::*;

    impl<T> sealed::Sealed for &CudaSlice<T> {}
    impl<'a, T> KernelArg<'a> for &'a CudaSlice<T> {
        fn push(self, builder: &mut LaunchArgs<'a>) {
            builder.arg(self);
        }
    }

    impl<T> sealed::Sealed for &mut CudaSlice<T> {}
    impl<'a, T> KernelArg<'a> for &'a mut CudaSlice<T> {
        fn push(self, builder: &mut LaunchArgs<'a>) {
            builder.arg(self);
        }
    }

    impl<T> sealed::Sealed for &CudaView<'_, T> {}
    impl<'a, 'b: 'a, T> KernelArg<'a> for &'a CudaView<'b, T> {
        fn push(self, builder: &mut LaunchArgs<'a>) {
            builder.arg(self);
        }
    }

    impl<T> sealed::Sealed for &mut CudaViewMut<'_, T> {}
    impl<'a, 'b: 'a, T> KernelArg<'a> for &'a mut CudaViewMut<'b, T> {
        fn push(self, builder: &mut LaunchArgs<'a>) {
            builder.arg(self);
        }
    }
}

impl sealed::Sealed for () {}
impl KernelArgs<'_> for () {
    #[cfg(feature = "cuda")]
    fn push_all(self, _: &mut LaunchArgs<'_>) {}
}

macro_rules! tuple_args {
    ($($a:ident)+) => {
        impl<$($a),+> sealed::Sealed for ($($a,)+) {}
        impl<'a, $($a: KernelArg<'a>),+> KernelArgs<'a> for ($($a,)+) {
            #[cfg(feature = "cuda")]
            #[allow(non_snake_case)]
            fn push_all(self, builder: &mut LaunchArgs<'a>) {
                let ($($a,)+) = self;
                $($a.push(builder);)+
            }
        }
    };
}
tuple_args!(A);
tuple_args!(A B);
tuple_args!(A B C);
tuple_args!(A B C D);
tuple_args!(A B C D E);
tuple_args!(A B C D E F);
tuple_args!(A B C D E F G);
tuple_args!(A B C D E F G H);
tuple_args!(A B C D E F G H I);
tuple_args!(A B C D E F G H I J);
tuple_args!(A B C D E F G H I J K);
tuple_args!(A B C D E F G H I J K L);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grid_stride_grid_has_one_thread_per_element_up_to_its_cap() {
        for (n, blocks) in [
            (0, 1),
            (1, 1),
            (256, 1),
            (257, 2),
            (256 * 8192, 8192),
            (256 * 8192 + 1, 8192),
            (usize::MAX, 8192),
        ] {
            let c = grid_stride(n);
            assert_eq!(c.grid_dim, (blocks, 1, 1), "n = {n}");
            assert_eq!(c.block_dim, (GRID_STRIDE_THREADS, 1, 1), "n = {n}");
            assert_eq!(c.shared_mem_bytes, 0);
            // Every element has a thread, unless the cap is reached (the loop covers the rest).
            let threads = blocks as usize * GRID_STRIDE_THREADS as usize;
            assert!(threads >= n || blocks == GRID_STRIDE_MAX_BLOCKS, "n = {n}");
        }
    }
}
