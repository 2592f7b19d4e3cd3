"""Compiled CPU kernels for the RWKV-7 forward pass and the sampler (C++, built once at install time).

`wkv7.cpp` fuses one token's state update (a bmm, a scale and a rank-2
update: three passes over each head's state) into one vectorised pass per
head, and reads a prompt's tokens in one call. `int8_linear.cpp` is the
`cpu int8` matrix product (rows quantised in the call, int8 weights read
as packed streams), used in place of fbgemm's where the build has AVX2, and
`f32_linear.cpp` the float32 one for the LoRAs (each row summed in one
order whatever the batch, where MKL's sgemm is not); both multiply several
weights in one call (`products.h`). `time_mix.cpp` fuses each mix's start
(layer norm, token shift, mixes) and the time mix's elementwise work before
and after the state update into one pass over each row for each; `sampling.cpp`
is the sampler's pass over the vocabulary (penalties, top logit, the tokens
min_p keeps), top_k, typical_p and XTC on the survivors, DRY's search for
repeats, and the draw. They are built by
`python -m inference.kernels` (`make install` runs it) into the virtual
environment, under a name that carries a digest of the source and the
compiler flags, so a changed either is never served by an old build.
Loading never compiles: a server starts in seconds whether or not the build
is there.

Without a build (no C++ compiler, or RPSERVER_KERNELS=off) the forward pass
uses the same maths as TorchScript operations (inference/rwkv7/ops.py `_step`,
`_steps`) and fbgemm's int8 products: results equal up to float rounding
(int8: within its bound), only slower; the sampler uses numpy and PyTorch
operations with the same float32 arithmetic (the same tokens kept).
"""

import functools
import hashlib
import logging
import os
import sys
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCES = [Path(__file__).with_name(name) for name in ("wkv7.cpp", "int8_linear.cpp", "f32_linear.cpp",
                                                             "time_mix.cpp", "sampling.cpp")]
HEADERS = [Path(__file__).with_name(name) for name in ("products.h", "avx2.h")]
BUILD_DIR = Path(sys.prefix) / "rpserver-kernels"


def library_name():
    """Named by a digest of the source and the compiler flags: a changed either is never served by an old build."""
    digest = hashlib.sha256(b"".join(source.read_bytes() for source in SOURCES + HEADERS) +
                            " ".join(compile_flags()).encode())
    return "rpserver_kernels_" + digest.hexdigest()[:12]


def library_path():
    return BUILD_DIR / library_name() / f"{library_name()}.so"


def compile_flags():
    """Vector instructions of the machine that builds (the build is not meant to be copied elsewhere),
    and OpenMP, which at::parallel_for needs to spread the heads over torch's threads. Where the CPU
    has VNNI (AVX512-VNNI with AVX512VL, or AVX-VNNI), the int8 products use its one-instruction
    dot products on the same 256-bit vectors."""
    flags = ["-O3", "-fopenmp"]
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma"]
        cpu = cpu_flags()
        if {"avx512_vnni", "avx512vl"} <= cpu:
            flags += ["-mavx512vnni", "-mavx512vl", "-mprefer-vector-width=256"]
        elif "avx_vnni" in cpu:
            flags += ["-mavxvnni"]
    return flags


@functools.cache
def cpu_flags():
    """The CPU's feature flags as Linux names them (empty elsewhere); read once (compile_flags() is
    asked for every layer's products as the model loads)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next((set(line.split(":", 1)[1].split()) for line in cpuinfo if line.startswith("flags")), set())
    except OSError:
        return set()


def build(verbose=False):
    """Compile the kernels (about 2 minutes on 2 cores); returns the library's path."""
    from torch.utils.cpp_extension import load

    directory = library_path().parent
    directory.mkdir(parents=True, exist_ok=True)
    load(name=library_name(), sources=[str(source) for source in SOURCES], build_directory=str(directory),
         extra_cflags=compile_flags(), extra_ldflags=["-fopenmp"], is_python_module=False, verbose=verbose)
    return library_path()


_loaded = None


def available():
    """Whether the compiled kernels are loaded (loading them on the first call)."""
    global _loaded
    if _loaded is None:
        _loaded = False
        if os.environ.get("RPSERVER_KERNELS", "on").lower() in ("off", "0", "false", "no"):
            logger.info("compiled kernels off (RPSERVER_KERNELS): the forward pass uses TorchScript operations")
        elif not library_path().is_file():
            logger.warning("compiled kernels not built (run `make install` or `python -m inference.kernels`): "
                           "the forward pass uses TorchScript operations, slower")
        else:
            torch.ops.load_library(str(library_path()))
            _loaded = True
    return _loaded


def vectorised():
    """Whether the kernels are loaded with their AVX2 rows: without them the matrix products
    (int8_linear.cpp, f32_linear.cpp) are slower than fbgemm's and MKL's, and are not used."""
    return available() and "-mavx2" in compile_flags()


def main():
    try:
        print(f"built {build()}")
    except Exception as exc:  # noqa: BLE001 - reported, and the fallback still serves
        print(f"the compiled kernels were not built ({type(exc).__name__}: {exc}); "
              "rpserver will use its TorchScript fallback", file=sys.stderr)
        return 1
    return 0
