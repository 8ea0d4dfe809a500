//! The raw cuBLAS GEMM (`cublasGemmEx` and its strided-batched form) on row-major operands,
//! through the operand swap of [`crate::layout`].

use std::ffi::c_void;

use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType};
use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use muon_core::{Error, Result, Transpose};

use crate::layout::{ColumnMajorGemm, Operand};
use crate::Precision;

/// A GEMM operand in device memory, in the element type its precision needs.
#[derive(Clone, Copy)]
pub(crate) enum GemmInput<'a> {
    /// `f32` elements (`Precision::F32` and `Precision::Tf32`).
    F32(&'a CudaSlice<f32>),
    /// bf16 bit patterns (`Precision::Bf16`).
    Bf16(&'a CudaSlice<u16>),
}

impl GemmInput<'_> {
    fn len(&self) -> usize {
        match self {
            GemmInput::F32(s) => s.len(),
            GemmInput::Bf16(s) => s.len(),
        }
    }

    fn data_type(&self) -> cudaDataType {
        match self {
            GemmInput::F32(_) => cudaDataType::CUDA_R_32F,
            GemmInput::Bf16(_) => cudaDataType::CUDA_R_16BF,
        }
    }
}

fn operation(t: Transpose) -> cublasOperation_t {
    match t {
        Transpose::No => cublasOperation_t::CUBLAS_OP_N,
        Transpose::Yes => cublasOperation_t::CUBLAS_OP_T,
    }
}

fn gemm_error(what: String) -> Error {
    Error::Backend(format!("cuBLAS GEMM: {what}"))
}

/// `v` as cuBLAS's 32-bit `int`.
fn int(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| gemm_error(format!("{what} = {v} exceeds cuBLAS's 32-bit range")))
}

/// `v` as cuBLAS's 64-bit stride.
fn stride(v: usize) -> Result<i64> {
    i64::try_from(v).map_err(|_| gemm_error(format!("a stride of {v} exceeds 64 bits")))
}

/// Whether `len` elements hold `batch` matrices `stride` apart.
fn holds(len: usize, batch: usize, stride: usize) -> bool {
    batch.checked_mul(stride).is_some_and(|n| n <= len)
}

/// Runs the column-major cuBLAS call `g` (made by [`crate::layout::row_major_gemm`]) on the
/// row-major operands `a` and `b`, writing `c = alpha * op(a) op(b) + beta * c` per matrix.
///
/// `precision` picks the compute type; `a` and `b` must hold bf16 exactly when it is
/// [`Precision::Bf16`]. Operands that do not fit `g`, or sizes beyond cuBLAS's integers, are
/// an error and launch nothing.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm(
    blas: &CudaBlas,
    stream: &CudaStream,
    g: &ColumnMajorGemm,
    precision: Precision,
    alpha: f32,
    a: GemmInput<'_>,
    b: GemmInput<'_>,
    beta: f32,
    c: &mut CudaSlice<f32>,
) -> Result<()> {
    let bf16 = precision == Precision::Bf16;
    if matches!(a, GemmInput::Bf16(_)) != bf16 || matches!(b, GemmInput::Bf16(_)) != bf16 {
        return Err(gemm_error(format!(
            "operand types do not match precision {precision}"
        )));
    }
    let pick = |op: Operand| match op {
        Operand::A => a,
        Operand::B => b,
    };
    let (first, second) = (pick(g.first), pick(g.second));
    // Strides equal the matrix sizes (dense stacks), so a stack needs batch * stride elements.
    let fits = holds(first.len(), g.batch, g.stride_a)
        && holds(second.len(), g.batch, g.stride_b)
        && holds(c.len(), g.batch, g.stride_c);
    if !fits {
        return Err(gemm_error(format!(
            "{} matrices do not fit operands of {}, {} and a result of {} elements",
            g.batch,
            first.len(),
            second.len(),
            c.len()
        )));
    }
    if g.batch == 0 || g.m == 0 || g.n == 0 {
        return Ok(());
    }
    let compute = match precision {
        Precision::F32 | Precision::Bf16 => cublasComputeType_t::CUBLAS_COMPUTE_32F,
        Precision::Tf32 => cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32,
    };
    let (m, n, k) = (int(g.m, "m")?, int(g.n, "n")?, int(g.k, "k")?);
    // cuBLAS requires leading dimensions >= 1 even for empty operands.
    let (lda, ldb, ldc) = (
        int(g.lda.max(1), "lda")?,
        int(g.ldb.max(1), "ldb")?,
        int(g.ldc.max(1), "ldc")?,
    );
    let (type_a, type_b) = (first.data_type(), second.data_type());
    let (ptr_a, _read_a) = match first {
        GemmInput::F32(s) => s.device_ptr(stream),
        GemmInput::Bf16(s) => s.device_ptr(stream),
    };
    let (ptr_b, _read_b) = match second {
        GemmInput::F32(s) => s.device_ptr(stream),
        GemmInput::Bf16(s) => s.device_ptr(stream),
    };
    let (ptr_c, _write_c) = c.device_ptr_mut(stream);
    let (alpha, beta) = (
        &alpha as *const f32 as *const c_void,
        &beta as *const f32 as *const c_void,
    );
    let (transa, transb) = (operation(g.transa), operation(g.transb));
    let algo = cublasGemmAlgo_t::CUBLAS_GEMM_DFALT;
    let batch = int(g.batch, "batch")?;
    let (stride_a, stride_b, stride_c) = (stride(g.stride_a)?, stride(g.stride_b)?, stride(g.stride_c)?);
    let failed = |e: cudarc::cublas::result::CublasError| gemm_error(format!("{e:?}"));
    if batch == 1 {
        // SAFETY: the handle is bound to `stream`, on which all three buffers live. With the
        // column-major sizes (m, n, k) and leading dimensions from `row_major_gemm`, cuBLAS
        // reads at most lda * cols(op a) elements of the first operand, ldb * cols(op b) of the
        // second and writes ldc * n of c: each is one matrix, inside the buffers (checked
        // above). The element types match `type_a`/`type_b` and C is f32 (CUDA_R_32F);
        // alpha and beta are host f32 pointers, valid for the call, as the default host
        // pointer mode and the 32F compute types expect. `c` is a distinct mutable borrow.
        unsafe {
            cudarc::cublas::result::gemm_ex(
                *blas.handle(),
                transa,
                transb,
                m,
                n,
                k,
                alpha,
                ptr_a as *const c_void,
                type_a,
                lda,
                ptr_b as *const c_void,
                type_b,
                ldb,
                beta,
                ptr_c as *mut c_void,
                cudaDataType::CUDA_R_32F,
                ldc,
                compute,
                algo,
            )
        }
        .map_err(failed)
    } else {
        // SAFETY: as for the single GEMM above, per matrix of the stack; matrix e of each
        // operand starts at e * stride, and batch * stride elements are inside each buffer
        // (checked above).
        unsafe {
            cudarc::cublas::result::gemm_strided_batched_ex(
                *blas.handle(),
                transa,
                transb,
                m,
                n,
                k,
                alpha,
                ptr_a as *const c_void,
                type_a,
                lda,
                stride_a,
                ptr_b as *const c_void,
                type_b,
                ldb,
                stride_b,
                beta,
                ptr_c as *mut c_void,
                cudaDataType::CUDA_R_32F,
                ldc,
                stride_c,
                batch,
                compute,
                algo,
            )
        }
        .map_err(failed)
    }
}
