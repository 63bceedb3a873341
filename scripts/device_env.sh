# Sourced on the GPU machine before running a `--features cuda` jumplens (see
# scripts/build_cuda.sh): puts the CUDA 13 runtime libraries of the machine's PyTorch wheels
# (cudart, cublas, cublasLt, curand, nvrtc, cusolver, cusparse, nvJitLink) and the driver's libcuda on LD_LIBRARY_PATH.
#   JUMPLENS_CUDA_LIBS  extra library folders to put first (e.g. a CUDA toolkit's lib64)
_site=${JUMPLENS_PY_SITE:-$(python3 -c 'import site; print(site.getsitepackages()[0])' 2>/dev/null)}
_libs=${JUMPLENS_CUDA_LIBS:-}
for _d in "$_site"/nvidia/*/lib "$_site"/nvidia/cu13/lib /usr/local/nvidia/lib64 /usr/local/cuda/lib64; do
  [ -d "$_d" ] && _libs=${_libs:+$_libs:}$_d
done
export LD_LIBRARY_PATH=$_libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
unset _site _libs _d
