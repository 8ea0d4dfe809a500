//! The backend's fused elementwise and reduction kernels, as CUDA C sources: the module
//! [`MODULE`] that the backend compiles with NVRTC and loads by name on first use, through the
//! same cache as anyone's kernels ([`CudaBackend::get_or_load_func`](crate::CudaBackend::get_or_load_func)).
//!
//! Every kernel is `extern "C"` (no name mangling), works on `f32` data, takes its element
//! counts as `long long`, and walks its range with a grid-stride loop, so any launch size is
//! correct and the launch code only picks a size that fills the GPU. Reductions accumulate in
//! `double`, like the portable backend, so both round the same sum the same way up to the
//! order of the additions.
//!
//! The sources are plain strings and this module needs no GPU and no CUDA library: the
//! kernel-compile test builds the module, and each kernel on its own, to a CUBIN for `sm_80`
//! and `sm_90` on any machine that has NVRTC (the `nvidia-cuda-nvrtc-cu12` wheel is enough).

use std::sync::LazyLock;

/// One kernel: its entry point and its CUDA C source (which compiles after [`COMMON`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelSource {
    /// The `extern "C"` name of the kernel, the function to load from the module.
    pub name: &'static str,
    /// Its CUDA C definition.
    pub source: &'static str,
}

/// The name of the backend's module: the key of its cache entry and NVRTC's program name
/// (`muon_kernels.cu` in compile logs).
pub const MODULE: &str = "muon_kernels";

/// Helpers shared by the kernels: the index type and a block-wide `double` sum.
pub const COMMON: &str = r#"
typedef long long i64;

__device__ __forceinline__ double muon_warp_sum(double v) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        v += __shfl_down_sync(0xffffffffu, v, offset);
    }
    return v;
}

// The sum of `v` over the block (blockDim.x a multiple of 32, at most 1024). The result is
// valid in thread 0 only. Uses static shared memory: call it once per kernel.
__device__ double muon_block_sum(double v) {
    __shared__ double warp_sums[32];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    v = muon_warp_sum(v);
    if (lane == 0) {
        warp_sums[warp] = v;
    }
    __syncthreads();
    const int warps = (blockDim.x + 31) >> 5;
    v = (threadIdx.x < warps) ? warp_sums[threadIdx.x] : 0.0;
    if (warp == 0) {
        v = muon_warp_sum(v);
    }
    return v;
}
"#;

/// `dst = alpha * x + beta * dst`; with `beta == 0` the destination is overwritten, never read
/// (BLAS convention: NaN in uninitialized memory must not leak through).
pub const AXPBY: KernelSource = KernelSource {
    name: "muon_axpby",
    source: r#"
extern "C" __global__ void muon_axpby(float* dst, const float* x, float alpha, float beta, i64 n) {
    const i64 stride = (i64)gridDim.x * blockDim.x;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const float ax = alpha * x[i];
        dst[i] = (beta == 0.0f) ? ax : ax + beta * dst[i];
    }
}
"#,
};

/// The Muon momentum step and its Nesterov look-ahead in one pass:
/// `m = mu m + g; out = nesterov ? mu m + g : m`.
pub const MOMENTUM_NESTEROV: KernelSource = KernelSource {
    name: "muon_momentum_nesterov",
    source: r#"
extern "C" __global__ void muon_momentum_nesterov(float* momentum, const float* grad, float* out,
                                                  float mu, int nesterov, i64 n) {
    const i64 stride = (i64)gridDim.x * blockDim.x;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const float g = grad[i];
        const float m = g + mu * momentum[i];
        momentum[i] = m;
        out[i] = nesterov ? mu * m + g : m;
    }
}
"#,
};

/// The decoupled update `param = keep * param - step * update`, `keep = 1 - lr * wd`
/// (computed on the host in `f32`, as the portable backend does).
pub const APPLY_UPDATE: KernelSource = KernelSource {
    name: "muon_apply_update",
    source: r#"
extern "C" __global__ void muon_apply_update(float* param, const float* update, float step,
                                             float keep, i64 n) {
    const i64 stride = (i64)gridDim.x * blockDim.x;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        param[i] = -step * update[i] + keep * param[i];
    }
}
"#,
};

/// AdamW's moments and direction:
/// `m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2; dir = (m / bc1) / (sqrt(v / bc2) + eps)`.
pub const ADAMW_DIRECTION: KernelSource = KernelSource {
    name: "muon_adamw_direction",
    source: r#"
extern "C" __global__ void muon_adamw_direction(float* dir, const float* grad, float* m, float* v,
                                                float beta1, float beta2, float eps,
                                                float bias_correction1, float bias_correction2,
                                                i64 n) {
    const i64 stride = (i64)gridDim.x * blockDim.x;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const float g = grad[i];
        const float mi = beta1 * m[i] + (1.0f - beta1) * g;
        const float vi = beta2 * v[i] + (1.0f - beta2) * g * g;
        m[i] = mi;
        v[i] = vi;
        dir[i] = (mi / bias_correction1) / (sqrtf(vi / bias_correction2) + eps);
    }
}
"#,
};

/// First pass of every reduction: block `(bx, item)` writes the sum of squares of its share of
/// stack item `item` (in `double`) to `partials[item * gridDim.x + bx]`.
pub const SUMSQ_PARTIALS: KernelSource = KernelSource {
    name: "muon_sumsq_partials",
    source: r#"
extern "C" __global__ void muon_sumsq_partials(const float* x, i64 item_len, double* partials) {
    const float* item = x + (i64)blockIdx.y * item_len;
    const i64 stride = (i64)gridDim.x * blockDim.x;
    double acc = 0.0;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < item_len; i += stride) {
        const double v = (double)item[i];
        acc += v * v;
    }
    acc = muon_block_sum(acc);
    if (threadIdx.x == 0) {
        partials[(i64)blockIdx.y * gridDim.x + blockIdx.x] = acc;
    }
}
"#,
};

/// Second pass of `frobenius_norm`: one block adds the `count` partials and writes the square
/// root of the total, as `f32`, to `out[index]` (the squares summed in `double` cannot
/// overflow where the norm itself fits in `f32`).
pub const SUMSQ_FINISH: KernelSource = KernelSource {
    name: "muon_sumsq_finish",
    source: r#"
extern "C" __global__ void muon_sumsq_finish(const double* partials, int count, float* out,
                                             i64 index) {
    double acc = 0.0;
    for (int i = threadIdx.x; i < count; i += blockDim.x) {
        acc += partials[i];
    }
    acc = muon_block_sum(acc);
    if (threadIdx.x == 0) {
        out[index] = (float)sqrt(acc);
    }
}
"#,
};

/// Second pass of the Frobenius normalization: block `item` adds that item's partials and
/// writes `inv[item] = 1 / (norm_scale * sqrt(sum) + eps)`, computed in `double`.
pub const NORM_FINISH: KernelSource = KernelSource {
    name: "muon_norm_finish",
    source: r#"
extern "C" __global__ void muon_norm_finish(const double* partials, int blocks_per_item,
                                            float norm_scale, float eps, float* inv) {
    const double* p = partials + (i64)blockIdx.x * blocks_per_item;
    double acc = 0.0;
    for (int i = threadIdx.x; i < blocks_per_item; i += blockDim.x) {
        acc += p[i];
    }
    acc = muon_block_sum(acc);
    if (threadIdx.x == 0) {
        inv[blockIdx.x] = (float)(1.0 / ((double)norm_scale * sqrt(acc) + (double)eps));
    }
}
"#,
};

/// Third pass of the Frobenius normalization: scales stack item `blockIdx.y` by `inv[item]`.
pub const SCALE_ITEMS: KernelSource = KernelSource {
    name: "muon_scale_items",
    source: r#"
extern "C" __global__ void muon_scale_items(float* x, i64 item_len, const float* inv) {
    float* item = x + (i64)blockIdx.y * item_len;
    const float s = inv[blockIdx.y];
    const i64 stride = (i64)gridDim.x * blockDim.x;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < item_len; i += stride) {
        item[i] *= s;
    }
}
"#,
};

/// `f32 -> bf16` with round-to-nearest-even (NaN stays NaN), for the bf16 GEMM operands. The
/// bits go out as `unsigned short`, so no `cuda_bf16.h` is needed.
pub const CAST_BF16: KernelSource = KernelSource {
    name: "muon_cast_bf16",
    source: r#"
extern "C" __global__ void muon_cast_bf16(const float* x, unsigned short* y, i64 n) {
    const i64 stride = (i64)gridDim.x * blockDim.x;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        unsigned int u = __float_as_uint(x[i]);
        if ((u & 0x7fffffffu) > 0x7f800000u) {
            y[i] = (unsigned short)((u >> 16) | 0x40u);
        } else {
            u += 0x7fffu + ((u >> 16) & 1u);
            y[i] = (unsigned short)(u >> 16);
        }
    }
}
"#,
};

/// `bf16 -> f32`, exact (a bf16 is the high half of an f32): the way back from a bf16
/// all-gather of Muon's `N_t`. Reads `x[0..n]`, writes `y[0..n]`.
pub const WIDEN_BF16: KernelSource = KernelSource {
    name: "muon_widen_bf16",
    source: r#"
extern "C" __global__ void muon_widen_bf16(const unsigned short* x, float* y, i64 n) {
    const i64 stride = (i64)gridDim.x * blockDim.x;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        y[i] = __uint_as_float(((unsigned int)x[i]) << 16);
    }
}
"#,
};

/// `p_e += a I` for each `m x m` matrix `e` of a stack of `batch`: Newton-Schulz folds its
/// `a_k X` term into the product `(a_k I + P) X` with it, instead of copying `X` every step.
pub const ADD_DIAGONAL: KernelSource = KernelSource {
    name: "muon_add_diagonal",
    source: r#"
extern "C" __global__ void muon_add_diagonal(float* p, i64 m, i64 batch, float a) {
    const i64 n = m * batch;
    const i64 stride = (i64)gridDim.x * blockDim.x;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const i64 item = i / m;
        const i64 j = i - item * m;
        p[item * m * m + j * (m + 1)] += a;
    }
}
"#,
};

/// Every kernel of [`MODULE`].
pub const KERNELS: [KernelSource; 11] = [
    AXPBY,
    MOMENTUM_NESTEROV,
    APPLY_UPDATE,
    ADAMW_DIRECTION,
    SUMSQ_PARTIALS,
    SUMSQ_FINISH,
    NORM_FINISH,
    SCALE_ITEMS,
    CAST_BF16,
    ADD_DIAGONAL,
    WIDEN_BF16,
];

/// The source of one kernel as NVRTC compiles it on its own: [`COMMON`] then the kernel.
pub fn single_kernel_source(kernel: KernelSource) -> String {
    let mut src = String::with_capacity(COMMON.len() + kernel.source.len());
    src.push_str(COMMON);
    src.push_str(kernel.source);
    src
}

/// The source of [`MODULE`], what the backend compiles and loads: [`COMMON`] then every kernel
/// of [`KERNELS`]. Built once per process; `'static`, as the module cache wants its sources.
pub fn module_source() -> &'static str {
    static SOURCE: LazyLock<String> = LazyLock::new(|| {
        let mut src = String::from(COMMON);
        for kernel in KERNELS {
            src.push_str(kernel.source);
        }
        src
    });
    &SOURCE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kernel_defines_its_entry_point_once() {
        let module = module_source();
        for kernel in KERNELS {
            let signature = format!("void {}(", kernel.name);
            let name = kernel.name;
            assert_eq!(
                kernel.source.matches(&signature).count(),
                1,
                "{name} in its own source"
            );
            assert_eq!(module.matches(&signature).count(), 1, "{name} in the module");
            assert!(
                kernel.source.contains("extern \"C\" __global__"),
                "{name} must be unmangled"
            );
        }
    }
}
