//! Opening the backend fails with a clear error, never a panic, wherever it cannot work: a
//! build without the `cuda` feature, a machine without a CUDA driver or GPU, a device ordinal
//! that does not exist.

use muon_core::Error;
use muon_cuda::CudaBackend;

fn backend_message(result: muon_core::Result<CudaBackend>) -> String {
    match result {
        Err(Error::Backend(msg)) => msg,
        Err(other) => panic!("expected Error::Backend, got {other:?}"),
        Ok(b) => panic!("expected an error, opened {b:?}"),
    }
}

#[cfg(not(feature = "cuda"))]
#[test]
fn without_the_feature_the_error_names_the_feature() {
    let msg = backend_message(CudaBackend::new(0));
    assert_eq!(msg, muon_cuda::NOT_COMPILED);
    assert!(
        msg.contains("muon-cuda was built without the `cuda` feature"),
        "{msg}"
    );
    assert!(!muon_cuda::is_available());
}

#[cfg(feature = "cuda")]
#[test]
fn without_a_gpu_the_error_says_what_is_missing() {
    if muon_cuda::is_available() {
        // On a GPU machine the same path is checked with an ordinal that does not exist.
        let msg = backend_message(CudaBackend::new(1 << 20));
        assert!(msg.contains("device(s)"), "{msg}");
        return;
    }
    let msg = backend_message(CudaBackend::new(0));
    assert!(
        msg.contains("no CUDA driver library")
            || msg.contains("device(s)")
            || msg.contains("counting devices"),
        "unclear error without a GPU: {msg}"
    );
    eprintln!("without_a_gpu_the_error_says_what_is_missing: no GPU here, error was: {msg}");
}

#[cfg(feature = "cuda")]
#[test]
fn an_nccl_id_without_the_nccl_library_names_the_library() {
    // Making a group's id needs libnccl but no GPU: where NCCL is missing the error must say
    // which library and how to get it; where it is present the id is made.
    match muon_cuda::NcclGroup::unique_id() {
        Ok(id) => {
            let bytes = id.as_bytes();
            assert_eq!(muon_cuda::NcclId::from_bytes(bytes).as_bytes(), bytes);
            eprintln!("an_nccl_id_without_the_nccl_library_names_the_library: NCCL present, id made");
        }
        Err(Error::Collective(msg)) => assert_eq!(msg, muon_cuda::NO_NCCL),
        Err(other) => panic!("expected Error::Collective naming NCCL, got {other:?}"),
    }
}
