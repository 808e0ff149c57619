"""Build torch_tcpx: the core (csrc/common, net, transport, collectives) and the
c10d backend (csrc/c10d) into one extension, torch_tcpx._C, against the
installed torch.

    pip install --no-build-isolation .      # or -e . for development

--no-build-isolation matters: an isolated build would download another torch.
"""
import glob
import os

from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def sources():
    core = []
    for layer in ("common", "net", "transport", "collectives", "c10d"):
        core += sorted(glob.glob(os.path.join("csrc", layer, "*.cc")))
        core += sorted(glob.glob(os.path.join("csrc", layer, "*.cpp")))
    return core


setup(
    name="torch_tcpx",
    version="0.1.0",
    description="A PyTorch distributed backend over TCP, built for GPU clusters on Ethernet",
    packages=find_packages(include=["torch_tcpx", "torch_tcpx.*"]),
    ext_modules=[
        CppExtension(
            name="torch_tcpx._C",
            sources=sources(),
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": ["-O3", "-Wall", "-Wno-unused-parameter"]},
            # Some toolchains (e.g. a GCC configured without a shared libstdc++)
            # link libstdc++ statically into the extension. Its symbols must then
            # stay private: with Python's -Bsymbolic-functions, our functions
            # would run against the process's libstdc++ data (locale ids) and
            # crash in the first ostringstream. A no-op with a shared libstdc++.
            extra_link_args=["-Wl,--exclude-libs,ALL"],
        )
    ],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.10",
    zip_safe=False,
)
