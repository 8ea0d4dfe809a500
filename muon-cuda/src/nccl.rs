//! [`NcclGroup`]: muon-core's [`Collective`] on NCCL, for Distributed Muon across GPUs.
//!
//! Each rank (one process or thread per GPU) opens its [`CudaBackend`], makes an
//! `NcclGroup` on it with the group's [`NcclId`], and hands the group to a
//! `muon_core::DistributedOptimizer`. The collectives run on the backend's stream, after the
//! work already queued there and before what follows, like every other call on the backend.
//!
//! NCCL's reduce-scatter and all-gather want `world` equal pieces; a tensor whose length is not
//! a multiple of `world` goes through a padded staging buffer (a device copy in or out, and a
//! memset of the padding), which grows to the largest tensor once, in the first step.

use std::cell::RefCell;
use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream};
use cudarc::nccl::{Comm, Id, ReduceOp};
use muon_core::{shard_capacity, shard_range, Collective, Error, Result};

use crate::device::{ensure, CudaBackend, CudaMatrix};
use crate::{raw, NO_NCCL};

fn nccl_error(what: &str, e: cudarc::nccl::result::NcclError) -> Error {
    Error::Collective(format!("NCCL: {what} failed: {:?}", e.0))
}

fn driver_error(what: &str, e: cudarc::driver::DriverError) -> Error {
    Error::Collective(format!("CUDA: {what} failed: {e}"))
}

/// The identity of an NCCL group: rank 0 makes it with [`NcclGroup::unique_id`] and sends its
/// 128 bytes ([`as_bytes`](Self::as_bytes)) to the other ranks by any means (a file, a
/// socket, the launcher's environment).
#[derive(Clone, Copy, Debug)]
pub struct NcclId(Id);

impl NcclId {
    /// The id's bytes, to send to the other ranks.
    pub fn as_bytes(&self) -> [u8; 128] {
        bytemuck::cast(*self.0.internal())
    }

    /// An id received from rank 0.
    pub fn from_bytes(bytes: [u8; 128]) -> Self {
        NcclId(Id::uninit(bytemuck::cast(bytes)))
    }
}

/// One rank of an NCCL group, bound to one [`CudaBackend`] (its GPU and stream).
///
/// Not `Send`: NCCL's communicator belongs to the thread that made it. Make it in the thread
/// (or process) that drives the rank's GPU.
pub struct NcclGroup {
    comm: Comm,
    stream: Arc<CudaStream>,
    /// Padded copies of tensors whose length is not a multiple of `world`.
    staging: RefCell<CudaSlice<f32>>,
    /// bf16 bits of this rank's shard and of every rank's, for `all_gather_bf16` (grown to
    /// the largest tensor once, then used through views of the exact lengths).
    bf16: RefCell<(CudaSlice<u16>, CudaSlice<u16>)>,
}

impl core::fmt::Debug for NcclGroup {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("NcclGroup")
            .field("rank", &self.comm.rank())
            .field("world_size", &self.comm.world_size())
            .finish()
    }
}

impl NcclGroup {
    /// A new group identity, made once by rank 0 (see [`NcclId`]). Errors when NCCL cannot
    /// be loaded.
    pub fn unique_id() -> Result<NcclId> {
        if !raw::nccl_library_present() {
            return Err(Error::Collective(NO_NCCL.into()));
        }
        Id::new()
            .map(NcclId)
            .map_err(|e| nccl_error("making a unique id", e))
    }

    /// Joins group `id` as rank `rank` of `world`, on `backend`'s GPU and stream. Blocks until
    /// every rank has joined (NCCL's `ncclCommInitRank`).
    pub fn new(backend: &CudaBackend, rank: usize, world: usize, id: NcclId) -> Result<Self> {
        if world == 0 || rank >= world {
            return Err(Error::InvalidConfig(format!(
                "NCCL rank {rank} of a group of {world}"
            )));
        }
        if !raw::nccl_library_present() {
            return Err(Error::Collective(NO_NCCL.into()));
        }
        let stream = backend.stream().clone();
        // NCCL takes its device from the thread's current context: make it this backend's.
        stream
            .context()
            .bind_to_thread()
            .map_err(|e| driver_error("binding the GPU's context to this thread", e))?;
        let comm = Comm::from_rank(stream.clone(), rank, world, id.0)
            .map_err(|e| nccl_error(&format!("joining the group as rank {rank} of {world}"), e))?;
        let staging = stream
            .alloc_zeros(1)
            .map_err(|e| driver_error("allocating the staging buffer", e))?;
        let alloc = |len| {
            stream
                .alloc_zeros::<u16>(len)
                .map_err(|e| driver_error("allocating the bf16 staging buffers", e))
        };
        let bf16 = RefCell::new((alloc(1)?, alloc(1)?));
        Ok(NcclGroup {
            comm,
            stream,
            staging: RefCell::new(staging),
            bf16,
        })
    }

    /// Checks that the call comes with the backend the group was made on, and that `shard`
    /// has the length every rank uses for a `full`-element tensor; returns that length.
    fn check(&self, backend: &CudaBackend, what: &str, full: usize, shard: usize) -> Result<usize> {
        self.check_backend(backend, what)?;
        let expected = shard_capacity(full, self.comm.world_size());
        if shard != expected {
            return Err(Error::Collective(format!(
                "rank {}: {what}: a shard of {shard} elements for a tensor of {full} over {} ranks \
                 (expected {expected})",
                self.comm.rank(),
                self.comm.world_size()
            )));
        }
        Ok(expected)
    }

    /// Checks that the call comes with the backend (GPU and stream) the group was made on.
    fn check_backend(&self, backend: &CudaBackend, what: &str) -> Result<()> {
        if Arc::ptr_eq(backend.stream(), &self.stream) {
            return Ok(());
        }
        Err(Error::Collective(format!(
            "{what}: an NCCL group must be used with the backend it was made on"
        )))
    }

    /// The staging buffer, grown to at least `len` elements (contents not kept).
    fn staging(&self, len: usize) -> Result<std::cell::RefMut<'_, CudaSlice<f32>>> {
        let mut staging = self.staging.borrow_mut();
        ensure(&self.stream, &mut staging, len)?;
        Ok(staging)
    }
}

impl Collective<CudaBackend> for NcclGroup {
    fn rank(&self) -> usize {
        self.comm.rank()
    }

    fn world_size(&self) -> usize {
        self.comm.world_size()
    }

    fn reduce_scatter_mean(
        &self,
        backend: &CudaBackend,
        full: &CudaMatrix,
        shard: &mut CudaMatrix,
    ) -> Result<()> {
        let (n, world) = (full.shape().len(), self.comm.world_size());
        let cap = self.check(backend, "reduce-scatter", n, shard.shape().len())?;
        let failed = |e| nccl_error("reduce-scatter", e);
        if n == cap * world {
            self.comm
                .reduce_scatter(full.as_cuda_slice(), shard.as_cuda_slice_mut(), &ReduceOp::Avg)
                .map_err(failed)?;
            return Ok(());
        }
        let mut staging = self.staging(cap * world)?;
        let (mut data, mut padding) = staging.split_at_mut(n);
        self.stream
            .memcpy_dtod(full.as_cuda_slice(), &mut data)
            .map_err(|e| driver_error("copying into the staging buffer", e))?;
        self.stream
            .memset_zeros(&mut padding.slice_mut(..cap * world - n))
            .map_err(|e| driver_error("zeroing the staging buffer's padding", e))?;
        let padded = staging.slice(..cap * world);
        self.comm
            .reduce_scatter(&padded, shard.as_cuda_slice_mut(), &ReduceOp::Avg)
            .map_err(failed)?;
        Ok(())
    }

    fn all_gather(&self, backend: &CudaBackend, shard: &CudaMatrix, full: &mut CudaMatrix) -> Result<()> {
        let (n, world) = (full.shape().len(), self.comm.world_size());
        let cap = self.check(backend, "all-gather", n, shard.shape().len())?;
        let failed = |e| nccl_error("all-gather", e);
        if n == cap * world {
            self.comm
                .all_gather(shard.as_cuda_slice(), full.as_cuda_slice_mut())
                .map_err(failed)?;
            return Ok(());
        }
        let mut staging = self.staging(cap * world)?;
        self.comm
            .all_gather(shard.as_cuda_slice(), &mut staging.slice_mut(..cap * world))
            .map_err(failed)?;
        self.stream
            .memcpy_dtod(&staging.slice(..n), full.as_cuda_slice_mut())
            .map_err(|e| driver_error("copying out of the staging buffer", e))
    }

    fn copy_shard(&self, backend: &CudaBackend, full: &CudaMatrix, shard: &mut CudaMatrix) -> Result<()> {
        let n = full.shape().len();
        self.check(backend, "copy of a shard", n, shard.shape().len())?;
        let range = shard_range(n, self.comm.world_size(), self.comm.rank());
        let len = range.len();
        let (mut own, mut padding) = shard.as_cuda_slice_mut().split_at_mut(len);
        if len > 0 {
            self.stream
                .memcpy_dtod(&full.as_cuda_slice().slice(range), &mut own)
                .map_err(|e| driver_error("copying a shard", e))?;
        }
        if !padding.is_empty() {
            self.stream
                .memset_zeros(&mut padding)
                .map_err(|e| driver_error("zeroing a shard's padding", e))?;
        }
        Ok(())
    }

    fn broadcast(&self, backend: &CudaBackend, root: usize, full: &mut CudaMatrix) -> Result<()> {
        let world = self.comm.world_size();
        self.check_backend(backend, "broadcast")?;
        if root >= world {
            return Err(Error::Collective(format!(
                "rank {}: broadcast from rank {root} in a group of {world}",
                self.comm.rank()
            )));
        }
        self.comm
            .broadcast_in_place(full.as_cuda_slice_mut(), root as i32)
            .map_err(|e| nccl_error("broadcast", e))?;
        Ok(())
    }

    /// Casts the shard to bf16 bits, gathers them as bytes (NCCL moves them without
    /// arithmetic) and widens the result: half the bytes of `all_gather` on the wire.
    fn all_gather_bf16(
        &self,
        backend: &CudaBackend,
        shard: &CudaMatrix,
        full: &mut CudaMatrix,
    ) -> Result<()> {
        let (n, world) = (full.shape().len(), self.comm.world_size());
        let cap = self.check(backend, "bf16 all-gather", n, shard.shape().len())?;
        let mut buffers = self.bf16.borrow_mut();
        let (own, all) = &mut *buffers;
        ensure(&self.stream, own, cap)?;
        ensure(&self.stream, all, cap * world)?;
        backend.cast_to_bf16(shard.as_cuda_slice(), own)?;
        let what = "bf16 all-gather";
        self.comm
            .all_gather(
                &raw::bytes(what, own, cap)?,
                &mut raw::bytes_mut(what, all, cap * world)?,
            )
            .map_err(|e| nccl_error(what, e))?;
        backend.widen_from_bf16(all, full.as_cuda_slice_mut())
    }
}
