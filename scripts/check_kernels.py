"""Compiles jumplens's NVRTC kernel sources (src/model/fused.rs) exactly as the binary does at
first use -- the base module with NVRTC's default options, the fused attention module for
compute_80 -- and assembles the PTX for sm_90 with ptxas, so a kernel the driver would refuse
(e.g. tensor-core instructions in PTX for too old a target) fails here, on the build machine,
instead of on the GPU. Needs the CUDA toolkit wheels of scripts/build_cuda.sh.

  python3 scripts/check_kernels.py CUDA_ROOT     (CUDA_ROOT: .cuda/nvidia/cu13)
"""
import ctypes
import os
import re
import subprocess
import sys

root = sys.argv[1] if len(sys.argv) > 1 else ".cuda/nvidia/cu13"
src = open(os.path.join(os.path.dirname(__file__), "..", "src", "model", "fused.rs")).read()
base = re.search(r'const SOURCE: &str = r#"(.*?)"#;', src, re.S).group(1)
flash = re.search(r'const FLASH_SOURCE: &str = r#"(.*?)"#;', src, re.S).group(1)
nvrtc = ctypes.CDLL(os.path.join(root, "lib", "libnvrtc.so.13"))


def build(code, opts, tag):
    prog = ctypes.c_void_p()
    assert nvrtc.nvrtcCreateProgram(ctypes.byref(prog), code.encode(), None, 0, None, None) == 0
    arr = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
    rc = nvrtc.nvrtcCompileProgram(prog, len(opts), arr)
    n = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
    log = ctypes.create_string_buffer(n.value)
    nvrtc.nvrtcGetProgramLog(prog, log)
    if rc != 0:
        sys.exit(f"{tag}: NVRTC failed:\n{log.value.decode()}")
    nvrtc.nvrtcGetPTXSize(prog, ctypes.byref(n))
    ptx = ctypes.create_string_buffer(n.value)
    nvrtc.nvrtcGetPTX(prog, ptx)
    path = f"/tmp/jumplens-{tag}.ptx"
    open(path, "wb").write(ptx.value)
    out = subprocess.run([os.path.join(root, "bin", "ptxas"), "-arch=sm_90", "-v", path, "-o", os.devnull],
                         capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{tag}: ptxas (sm_90) refused the PTX:\n{out.stderr[:3000]}")
    spills = [l for l in out.stderr.splitlines() if "spill" in l and " 0 bytes spill stores" not in l]
    print(f"{tag}: PTX assembles for sm_90" + (f" (spills: {spills})" if spills else ""))


build(base, [], "fused")
build(base + "\n" + flash, ["--gpu-architecture=compute_80"], "flash")
