"""Build and install MinkowskiEngine 0.5.4 for the installed torch, on CPU or CUDA (12 and 13).

MinkowskiEngine is published only as a source release, last released in 2021. This script makes that
release build on today's toolchains without vendoring any of its sources:

1. fetch the sdist from the package registry (``pip download``; or take ``--sdist FILE`` offline) and
   check its sha256;
2. make sure OpenBLAS headers exist (``apt-get install libopenblas-dev`` when missing and allowed, or
   unpack carried Debian packages with ``--openblas-debs DIR``);
3. for CUDA builds, apply the source fixes that CUDA 12/13 and current torch headers need
   (``CUDA_FIXES`` below, each checked to apply exactly once);
4. ``pip wheel --no-build-isolation --use-pep517`` with the options handed to its ``setup.py``
   (``--cpu_only``/``--force_cuda``, an explicit ``--blas=openblas``, so numpy.distutils is never used);
5. cache the wheel (keyed by Python, torch and target) and ``pip install`` it, then import it.

The Python >= 3.10 ``collections.Sequence`` incompatibility is not patched here: the backend imports
MinkowskiEngine through ``sparse_ops.minkowski.import_minkowski``, which aliases it first.

Usage::

    python scripts/install_minkowski.py                  # CUDA build if a GPU and nvcc are here, else CPU
    python scripts/install_minkowski.py --target cpu
    python scripts/install_minkowski.py --download-only DIR        # fetch the sdist to carry offline
    python scripts/install_minkowski.py --sdist FILE --openblas-debs DIR   # offline build
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

VERSION = "0.5.4"
SDIST_NAME = f"MinkowskiEngine-{VERSION}.tar.gz"
SDIST_SHA256 = "b1879c00d0b0b1d30ba622cce239886a7e3c78ee9da1064cdfe2f64c2ab15f94"
MIN_PIP = (23, 1)  # -C/--config-settings reaching setup.py through the PEP 517 legacy backend
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fcmae-toolkit" / "minkowski"
THRUST_HEADERS = ("copy", "count", "execution_policy", "fill", "functional", "reduce", "remove", "scan",
                  "sequence", "sort", "unique")
PREFETCH_HELPER = """
// CUDA 13 takes a cudaMemLocation and flags instead of a device id.
static inline cudaError_t fcmae_prefetch(const void* ptr, size_t bytes, int dev_id, cudaStream_t stream) {
#if CUDART_VERSION >= 13000
  cudaMemLocation location{};
  location.type = cudaMemLocationTypeDevice;
  location.id = dev_id;
  return cudaMemPrefetchAsync(ptr, bytes, location, 0, stream);
#else
  return cudaMemPrefetchAsync(ptr, bytes, dev_id, stream);
#endif
}
"""

# (file, old text, new text, expected count). See ../shared/reference/minkowski.md section 3 for the errors.
CUDA_FIXES: tuple[tuple[str, str, str, int], ...] = (
    # CCCL 3 (CUDA 13) removed thrust::unary_function.
    ("src/coordinate_map_functors.cuh",
     "struct find_coordinate\n    : public thrust::unary_function<uint32_t,\n"
     "                                    thrust::pair<uint32_t, uint32_t>> {",
     "struct find_coordinate {", 1),
    # Newer thrust no longer includes these transitively (MinkowskiEngine issues #543, #594, #601).
    ("src/gpu.cuh", "#include <driver_types.h> // cuda driver types\n",
     "#include <driver_types.h> // cuda driver types\n"
     + "".join(f"#include <thrust/{h}.h>\n" for h in THRUST_HEADERS), 1),
    ("src/3rdparty/concurrent_unordered_map.cuh", "#include <thrust/count.h>\n",
     "#include <thrust/count.h>\n#include <thrust/execution_policy.h>\n" + PREFETCH_HELPER, 1),
    # CUDA 13 changed cudaMemPrefetchAsync's signature.
    ("src/3rdparty/concurrent_unordered_map.cuh", "CUDA_TRY(cudaMemPrefetchAsync(", "CUDA_TRY(fcmae_prefetch(", 1),
    ("src/3rdparty/concurrent_unordered_map.cuh", "CUDA_TRY(\n        cudaMemPrefetchAsync(",
     "CUDA_TRY(\n        fcmae_prefetch(", 1),
    ("src/3rdparty/concurrent_unordered_map.cuh", "CUDA_TRY(\n          cudaMemPrefetchAsync(",
     "CUDA_TRY(\n          fcmae_prefetch(", 1),
    # unique_ptr -> shared_ptr assignment is ambiguous under libcu++ ADL (issue #596).
    ("src/coordinate_map_gpu.cuh", "      m_map = map_type::create(", "      auto created_map = map_type::create(", 1),
    ("src/coordinate_map_gpu.cuh", "m_hasher, m_equal, m_map_allocator);\n",
     "m_hasher, m_equal, m_map_allocator);\n"
     "      m_map = std::shared_ptr<map_type>(created_map.release(), created_map.get_deleter());\n", 1),
    # torch >= 1.11 headers need at::Tensor complete before CUDAUtils.h (upstream c89b4cf).
    ("src/spmm.cu", "#include <ATen/cuda/CUDAUtils.h>\n",
     "#include <ATen/core/Tensor.h>\n#include <ATen/cuda/CUDAUtils.h>\n", 1),
    # CUDA's own nvtx3 (pulled in by CCCL) collides with the bundled cudf copy (issue #614).
    ("setup.py", 'NVCC_FLAGS += ["--expt-relaxed-constexpr", "--expt-extended-lambda"]',
     'NVCC_FLAGS += ["--expt-relaxed-constexpr", "--expt-extended-lambda", "-DCCCL_DISABLE_NVTX"]', 1),
    # CUDA 13 moved thrust/cub to include/cccl, which nvcc adds for itself but g++ does not get.
    ("setup.py", '    libraries.append("cusparse")\n',
     '    libraries.append("cusparse")\n'
     '    from torch.utils.cpp_extension import CUDA_HOME as _CUDA_HOME\n'
     '    if _CUDA_HOME and os.path.isdir(os.path.join(_CUDA_HOME, "include", "cccl")):\n'
     '        include_dirs.append(os.path.join(_CUDA_HOME, "include", "cccl"))\n', 1),
)


def log(message: str) -> None:
    print(f"[install_minkowski] {message}", flush=True)


def run(cmd: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
    log("$ " + " ".join(cmd))
    subprocess.run(cmd, check=True, env=env, cwd=cwd)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_pip() -> None:
    """Fail unless pip hands ``-C--global-option`` to the setuptools backend."""
    version = tuple(int(p) for p in importlib.metadata.version("pip").split(".")[:2])
    if version < MIN_PIP:
        raise SystemExit(f"pip {'.'.join(map(str, version))} is too old; run `python -m pip install -U pip` "
                         f"(need >= {'.'.join(map(str, MIN_PIP))})")


def fetch_sdist(dest: Path) -> Path:
    """Download the sdist into ``dest`` (once) and check its hash.

    pip prepares metadata while downloading; the sdist's setup.py then asks numpy.distutils for a BLAS,
    which only works with the stdlib distutils (Python <= 3.11). Offline or on 3.12+, pass ``--sdist``.
    """
    target = dest / SDIST_NAME
    if not target.exists():
        dest.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "SETUPTOOLS_USE_DISTUTILS": "stdlib"}
        run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--no-build-isolation",
             "-d", str(dest), f"MinkowskiEngine=={VERSION}"], env=env)
    return verified(target)


def verified(sdist: Path) -> Path:
    digest = sha256(sdist)
    if digest != SDIST_SHA256:
        raise SystemExit(f"{sdist}: sha256 {digest} is not the MinkowskiEngine {VERSION} release {SDIST_SHA256}")
    return sdist


def find_cblas_include(extra: list[str]) -> str | None:
    """First directory holding ``cblas.h`` among ``extra`` and the compiler's default include dirs."""
    multiarch = subprocess.run(["gcc", "-print-multiarch"], capture_output=True, text=True).stdout.strip()
    candidates = [*extra, "/usr/include", f"/usr/include/{multiarch}", "/usr/local/include"]
    return next((d for d in candidates if d and Path(d, "cblas.h").exists()), None)


def apt_install_openblas() -> None:
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        raise SystemExit("OpenBLAS headers (cblas.h) not found: install libopenblas-dev (Debian/Ubuntu), "
                         "or pass --openblas-debs DIR / --blas-include-dir DIR")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run(["apt-get", "update", "-qq"], env=env)
    run(["apt-get", "install", "-y", "-qq", "libopenblas-dev"], env=env)


def unpack_debs(debs: Path, prefix: Path) -> tuple[str, list[str]]:
    """Unpack carried OpenBLAS ``.deb`` files into ``prefix`` (never into ``/``).

    Returns:
        The include dir holding ``cblas.h`` and the library dirs to link and load from.
    """
    prefix.mkdir(parents=True, exist_ok=True)  # some dpkg versions do not create missing parents
    for deb in sorted(debs.glob("*.deb")):
        run(["dpkg", "-x", str(deb), str(prefix)])
    header = next(prefix.rglob("cblas.h"), None)
    if header is None:
        raise SystemExit(f"no cblas.h in the packages under {debs}")
    libdirs = sorted({str(p.parent) for p in prefix.rglob("libopenblas.so*")} | {str(p.parent) for p in
                                                                                 prefix.rglob("libgfortran.so*")})
    return str(header.parent), libdirs


def apply_cuda_fixes(src: Path) -> None:
    """Apply ``CUDA_FIXES`` to an unpacked sdist; each must match exactly its expected number of times."""
    for name, old, new, count in CUDA_FIXES:
        path = src / name
        text = path.read_text()
        found = text.count(old)
        if found != count:
            raise SystemExit(f"CUDA fix for {name} expected {count} match(es) of {old[:60]!r}, found {found}")
        path.write_text(text.replace(old, new))
    log(f"applied {len(CUDA_FIXES)} CUDA source fixes")


def cuda_arch_list() -> str | None:
    """``TORCH_CUDA_ARCH_LIST`` from the environment, else the visible GPU's capability."""
    import torch

    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return f"{major}.{minor}"
    return None


def choose_target(requested: str) -> str:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    if requested != "auto":
        return requested
    return "cuda" if torch.version.cuda and torch.cuda.is_available() and CUDA_HOME else "cpu"


def cache_key(target: str) -> str:
    import torch

    arch = f"-sm{cuda_arch_list()}" if target == "cuda" else ""
    return f"py{sys.version_info.major}{sys.version_info.minor}-torch{torch.__version__}-{target}{arch}"


def build_wheel(sdist: Path, target: str, out: Path, blas_include: str | None, libdirs: list[str],
                jobs: int) -> Path:
    """Unpack, fix (CUDA) and build the wheel into ``out``; returns the wheel path."""
    with tempfile.TemporaryDirectory(prefix="minkowski-build-") as tmp:
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data")
        src = Path(tmp) / f"MinkowskiEngine-{VERSION}"
        if target == "cuda":
            apply_cuda_fixes(src)
        options = ["--cpu_only" if target == "cpu" else "--force_cuda", "--blas=openblas"]
        if blas_include:
            options.append(f"--blas_include_dirs={blas_include}")
        env = {**os.environ, "MAX_JOBS": str(jobs)}
        if libdirs:
            env["LIBRARY_PATH"] = os.pathsep.join([*libdirs, env.get("LIBRARY_PATH", "")])
        if target == "cuda" and cuda_arch_list():
            env["TORCH_CUDA_ARCH_LIST"] = cuda_arch_list()
        out.mkdir(parents=True, exist_ok=True)
        run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "--use-pep517",
             "-w", str(out), f"-C--global-option={' '.join(options)}"], env=env)
    return cached_wheel(out)


def cached_wheel(directory: Path) -> Path | None:
    prefix = f"minkowskiengine-{VERSION}-"  # pip normalises the name's case
    wheels = sorted(w for w in directory.glob("*.whl") if w.name.lower().startswith(prefix))
    return wheels[-1] if wheels else None


def import_check(target: str, libdirs: list[str]) -> bool:
    """Import MinkowskiEngine through the backend's shim in a fresh interpreter."""
    code = ("from sparse_ops.minkowski import import_minkowski; ME = import_minkowski(); "
            "print('MinkowskiEngine', ME.__version__, 'cuda' if ME.is_cuda_available() else 'cpu'); "
            f"raise SystemExit(0 if {target == 'cpu'} or ME.is_cuda_available() else 3)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    if libdirs:
        env["LD_LIBRARY_PATH"] = os.pathsep.join([*libdirs, env.get("LD_LIBRARY_PATH", "")])
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO_ROOT).returncode == 0


def installed_version() -> str | None:
    try:
        return importlib.metadata.version("MinkowskiEngine")
    except importlib.metadata.PackageNotFoundError:
        return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", choices=("auto", "cpu", "cuda"), default="auto",
                        help="cuda when torch sees a GPU and nvcc is found (auto), else cpu")
    parser.add_argument("--sdist", type=Path, help="use this MinkowskiEngine-0.5.4.tar.gz instead of downloading")
    parser.add_argument("--download-only", type=Path, metavar="DIR", help="fetch the sdist into DIR and stop")
    parser.add_argument("--openblas-debs", type=Path, metavar="DIR",
                        help="unpack these OpenBLAS .deb files into the cache and build against them")
    parser.add_argument("--blas-include-dir", default=None, help="directory holding cblas.h")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help=f"default {DEFAULT_CACHE}")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compile jobs")
    parser.add_argument("--force", action="store_true", help="rebuild even if installed or cached")
    return parser.parse_args(argv)


def blas_setup(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    if args.openblas_debs:
        return unpack_debs(args.openblas_debs, args.cache_dir / "openblas")
    include = find_cblas_include([args.blas_include_dir] if args.blas_include_dir else [])
    if include is None:
        apt_install_openblas()
        include = find_cblas_include([])
    return include, []


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.download_only:
        log(f"sdist at {fetch_sdist(args.download_only)}")
        return
    target = choose_target(args.target)
    include, libdirs = blas_setup(args)
    if not args.force and installed_version() == VERSION and import_check(target, libdirs):
        log(f"MinkowskiEngine {VERSION} already installed and importable ({target})")
        return
    wheel_dir = args.cache_dir / "wheels" / cache_key(target)
    wheel = None if args.force else cached_wheel(wheel_dir)
    if wheel is None:
        check_pip()
        sdist = verified(args.sdist) if args.sdist else fetch_sdist(args.cache_dir / "sdist")
        log(f"building MinkowskiEngine {VERSION} for {target} ({cache_key(target)}); this takes minutes")
        wheel = build_wheel(sdist, target, wheel_dir, include, libdirs, args.jobs)
    else:
        log(f"using cached wheel {wheel}")
    run([sys.executable, "-m", "pip", "install", "--no-deps", "--force-reinstall", str(wheel)])
    if not import_check(target, libdirs):
        raise SystemExit("MinkowskiEngine installed but does not import; see the error above")
    if libdirs:
        log("at run time set LD_LIBRARY_PATH=" + os.pathsep.join(libdirs))


if __name__ == "__main__":
    main()
