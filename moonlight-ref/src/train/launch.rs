//! How the `train` command runs: alone, or, with the `mpi` feature and under `mpirun`, as one
//! rank of the MPI job (the rank and the world size read from MPI).

use std::time::Duration;

use muon_faer::Faer;

use super::{RunResult, TrainError, TrainOptions};

/// Whether this process was started by an MPI launcher (Open MPI's `mpirun`/`mpiexec`, or a
/// PMI/PMIx launcher such as `srun`): only then does the trainer initialize MPI, so a plain
/// run of an MPI build stays a plain process.
pub fn under_mpi_launcher() -> bool {
    ["OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_SIZE"]
        .iter()
        .any(|v| std::env::var_os(v).is_some())
}

/// Trains as `opts` says, alone or as a rank of the MPI job that started this process
/// ([`under_mpi_launcher`]; needs the `mpi` feature). `timeout` bounds how long a rank waits
/// in one collective for the others (MPI only; `None`: muon-faer's default). Returns the run
/// and whether this process is the one that reports it (rank 0).
///
/// Under MPI, a rank that fails with anything but an interruption (which every rank agrees
/// on) ends the whole job at once (`MPI_Abort`, after printing its error): its error may be
/// its own, and the others would otherwise wait for it until their deadline.
pub fn train_process(
    backend: &Faer<f32>,
    opts: &TrainOptions,
    timeout: Option<Duration>,
) -> Result<(RunResult, bool), TrainError> {
    #[cfg(feature = "mpi")]
    if under_mpi_launcher() {
        return train_mpi(backend, opts, timeout);
    }
    #[cfg(not(feature = "mpi"))]
    if under_mpi_launcher() {
        return Err(TrainError::Config(
            "started by an MPI launcher, but this build has no MPI: build with `--features mpi`".into(),
        ));
    }
    let _ = timeout;
    super::train(backend, opts).map(|run| (run, true))
}

#[cfg(feature = "mpi")]
fn train_mpi(
    backend: &Faer<f32>,
    opts: &TrainOptions,
    timeout: Option<Duration>,
) -> Result<(RunResult, bool), TrainError> {
    use muon_faer::MpiGroup;
    let mut group = MpiGroup::<f32>::init().map_err(super::parallel::group_error)?;
    if let Some(t) = timeout {
        group = group.with_timeout(t);
    }
    // A second communicator, kept here to abort the job with: the first goes to the optimizer.
    let control = group.another::<f32>();
    let (rank, world) = (group.rank(), group.world_size());
    match super::train_on(backend, opts, group) {
        Ok(run) => Ok((run, rank == 0)),
        Err(e @ TrainError::Interrupted { .. }) => Err(e),
        Err(e) if world > 1 => control.abort(&e.to_string()),
        Err(e) => Err(e),
    }
}
