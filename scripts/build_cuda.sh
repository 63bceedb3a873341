#!/usr/bin/env bash
# Builds jumplens with the `cuda` feature for an NVIDIA Hopper GPU (H100/H200, compute capability
# 9.0) on a machine with no GPU, no driver and no system CUDA: the CUDA 13.0 toolkit comes as PyPI
# wheels, and the driver library is replaced at link time by a stub that only carries the
# symbols cudarc links against (the real libcuda.so.1 is found at run time on the GPU machine).
#
#   scripts/build_cuda.sh            # -> dist/jumplens-cuda (stripped binary)
#
# Environment: JUMPLENS_CUDA_TREE (default .cuda/) holds the unpacked toolkit; CARGO_TARGET_DIR
# defaults to target-cuda/ so the CPU build in target/ is left alone. A clean build takes about
# 15-25 minutes on 2 cores (candle's kernels are compiled by nvcc).
#
# Running the binary on the GPU machine needs the CUDA 13 runtime libraries (cudart, cublas,
# cublasLt, curand, nvrtc, cusolver with its cusparse and nvJitLink) and the driver on LD_LIBRARY_PATH; scripts/device_env.sh sets that up
# for a machine with PyTorch's CUDA 13 wheels installed. Use CUDA 13.0, not newer: the driver
# (580, CUDA 13.0) JIT-compiles candle's PTX and rejects a newer PTX ISA.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TREE=${JUMPLENS_CUDA_TREE:-$ROOT/.cuda}
CU=$TREE/nvidia/cu13
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target-cuda}

WHEELS=(
  nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-runtime==13.0.96
  nvidia-cuda-crt==13.0.88 nvidia-cuda-cccl==13.0.85 nvidia-cublas==13.0.2.14
  nvidia-curand==10.4.0.35 nvidia-cuda-nvrtc==13.0.88
  nvidia-cusolver==12.0.4.66 nvidia-cusparse==12.6.3.3 nvidia-nvjitlink==13.0.88
)

# A tree made before cuSOLVER joined the list is fetched again.
[ -e "$CU/lib/libcusolver.so" ] || rm -f "$TREE/.complete"
if [ ! -f "$TREE/.complete" ]; then
  echo "== fetching the CUDA 13.0 toolkit wheels into $TREE"
  mkdir -p "$TREE/wheels"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux2014_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64 \
    -d "$TREE/wheels" "${WHEELS[@]}"
  for w in "$TREE"/wheels/*.whl; do python3 -m zipfile -e "$w" "$TREE"; done
  chmod +x "$CU"/bin/* "$CU"/nvvm/bin/* 2>/dev/null || true
  # The wheels ship only versioned sonames; the linker looks for lib<name>.so.
  for so in "$CU"/lib/lib*.so.*; do
    base=${so%%.so.*}.so
    [ -e "$base" ] || ln -s "$(basename "$so")" "$base"
  done
  # nvcc looks for lib64 and for cicc under nvvm/bin beside bin/.
  [ -e "$CU/lib64" ] || ln -s lib "$CU/lib64"
  # Link-time stand-in for the driver library: every cu* entry point cudarc declares.
  CUDARC_SYS=$(cargo metadata --format-version 1 --features cuda --manifest-path "$ROOT/Cargo.toml" \
    | python3 -c 'import json,sys; m=json.load(sys.stdin); print(next(p["manifest_path"] for p in m["packages"] if p["name"]=="cudarc").rsplit("/",1)[0])')/src/driver/sys/mod.rs
  grep -o 'pub unsafe fn cu[A-Za-z0-9_]*' "$CUDARC_SYS" | awk '{print $4}' | sort -u \
    | awk '{print "int " $1 "(void) { return 999; }"}' >"$TREE/cuda_stub.c"
  mkdir -p "$TREE/stub"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$TREE/stub/libcuda.so" "$TREE/cuda_stub.c"
  touch "$TREE/.complete"
fi

export CUDA_HOME=$CU CUDA_PATH=$CU CUDA_ROOT=$CU
export PATH=$CU/bin:$PATH
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export CUDARC_CUDA_VERSION=13000
export LIBRARY_PATH=$TREE/stub:$CU/lib${LIBRARY_PATH:+:$LIBRARY_PATH}
export RUSTFLAGS="${RUSTFLAGS:-} -L native=$TREE/stub -L native=$CU/lib"
nvcc --version | tail -2

cargo build --release --features cuda --bin jumplens --manifest-path "$ROOT/Cargo.toml"
mkdir -p "$ROOT/dist"
# The NVRTC kernels compile only on the GPU machine at first use: assemble them here first.
LD_LIBRARY_PATH="$CUDA_ROOT/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" python3 "$ROOT/scripts/check_kernels.py" "$CUDA_ROOT"
strip -o "$ROOT/dist/jumplens-cuda" "$CARGO_TARGET_DIR/release/jumplens"
xz -T0 -6 -f -k "$ROOT/dist/jumplens-cuda"
ls -la "$ROOT"/dist/jumplens-cuda*
