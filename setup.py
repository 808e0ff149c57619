"""Build torch_tcpx: the core (csrc/common, net, transport, collectives) and the
c10d backend (csrc/c10d) into one extension, torch_tcpx._C, against the
installed torch.

    pip install --no-build-isolation .      # or -e . for development

--no-build-isolation matters: an isolated build would download another torch.

The CUDA parts (csrc/**/*.cu, and the CUDA paths of the C++ sources under
TCPX_WITH_CUDA) are built when the installed torch has CUDA and nvcc is
found (CUDA_HOME or PATH); otherwise the extension supports CPU tensors only.
TCPX_BUILD_CUDA=0 forces a CPU-only build, =1 makes a missing CUDA an error.
TORCH_CUDA_ARCH_LIST picks the GPU architectures as for any torch extension
(default here: 9.0, the H100/H200 of the target clusters).
"""
import glob
import os

import torch
from setuptools import find_packages, setup
from torch.utils import cpp_extension
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
LAYERS = ("common", "net", "transport", "collectives", "c10d")


def sources(patterns):
    found = []
    for layer in LAYERS:
        for pattern in patterns:
            found += sorted(glob.glob(os.path.join("csrc", layer, pattern)))
    return found


def want_cuda():
    setting = os.environ.get("TCPX_BUILD_CUDA", "auto").strip().lower()
    if setting in ("0", "no", "off", "false"):
        return False
    have = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if setting in ("1", "yes", "on", "true") and not have:
        raise RuntimeError(
            "TCPX_BUILD_CUDA=1 but torch %s has no CUDA or nvcc was not found (CUDA_HOME=%s)"
            % (torch.__version__, cpp_extension.CUDA_HOME))
    return have


def extension():
    cxx = ["-O3", "-Wall", "-Wno-unused-parameter"]
    # Some toolchains (e.g. a GCC configured without a shared libstdc++)
    # link libstdc++ statically into the extension. Its symbols must then
    # stay private: with Python's -Bsymbolic-functions, our functions
    # would run against the process's libstdc++ data (locale ids) and
    # crash in the first ostringstream. A no-op with a shared libstdc++.
    link = ["-Wl,--exclude-libs,ALL"]
    if not want_cuda():
        return CppExtension(
            name="torch_tcpx._C",
            sources=sources(["*.cc", "*.cpp"]),
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx},
            extra_link_args=link,
        )
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    return CUDAExtension(
        name="torch_tcpx._C",
        sources=sources(["*.cc", "*.cpp", "*.cu"]),
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=[("TCPX_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17"]},
        extra_link_args=link,
    )


setup(
    name="torch_tcpx",
    version="0.1.0",
    description="A PyTorch distributed backend over TCP, built for GPU clusters on Ethernet",
    packages=find_packages(include=["torch_tcpx", "torch_tcpx.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.10",
    zip_safe=False,
)
