# Sourced by .ci/run (under `set -euo pipefail`): puts the NVRTC of the `nvidia-cuda-nvrtc-cu12`
# wheel on the dynamic loader's path.
#
# cudarc 0.19 (`dynamic-loading`) dlopens NVRTC by bare name, trying libnvrtc.so,
# libnvrtc.so.12, ... (cudarc::get_lib_name_candidates); it reads no CUDA_PATH at run time. A
# bare name is searched in LD_LIBRARY_PATH, so that is what has to point at the wheel's lib/
# directory, which ships libnvrtc.so.12 (one of the names tried) and the libnvrtc-builtins
# library NVRTC loads next to it.
muon_nvrtc_lib="$(python3 - <<'PY' 2>/dev/null || true
import os
import nvidia.cuda_nvrtc as m
print(os.path.join(list(m.__path__)[0], "lib"))
PY
)"
if [ -n "${muon_nvrtc_lib}" ] && [ -d "${muon_nvrtc_lib}" ]; then
    case ":${LD_LIBRARY_PATH:-}:" in
        *":${muon_nvrtc_lib}:"*) ;;
        *) export LD_LIBRARY_PATH="${muon_nvrtc_lib}${LD_LIBRARY_PATH:+:${LD_LIBRARY_PATH}}" ;;
    esac
fi
unset muon_nvrtc_lib
