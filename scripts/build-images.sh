#!/usr/bin/env bash
# Build (and with --push, push) the two images where a registry and disk space exist:
#   REGISTRY=registry.example.com/ml scripts/build-images.sh [--push] [--cpu]
# operator: the kopf operator (no torch); runtime: the CUDA runtime (pulls the ~10 GB pytorch/pytorch
# CUDA base: give it ~30 GB free); --cpu adds runtime-cpu (TORCH=cpu: torch 2.13.0+cpu on the Python
# base, for CPU nodes). Uses docker (BuildKit) if present, else buildah. The bases default to the
# Dockerfile's pinned digests; PYTHON_BASE / CUDA_TORCH_BASE / TORCH_CPU_INDEX override them (a mirror).
# tests/packaging/test_image_build.py builds operator and the CPU runtime on machines without either.
set -euo pipefail
cd "$(dirname "$0")/.."
REGISTRY="${REGISTRY:?set REGISTRY, e.g. registry.example.com/ml}"
VERSION="$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)"
push=0 cpu=0
for arg in "$@"; do
  case "$arg" in
    --push) push=1 ;;
    --cpu) cpu=1 ;;
    *) echo "usage: REGISTRY=... $0 [--push] [--cpu]" >&2; exit 2 ;;
  esac
done
if command -v docker >/dev/null; then
  engine=(docker build)
  export DOCKER_BUILDKIT=1
  pusher=(docker push)
elif command -v buildah >/dev/null; then
  engine=(buildah build --format docker --layers)
  pusher=(buildah push)
else
  echo "needs docker or buildah" >&2
  exit 1
fi
args=()
for name in PYTHON_BASE CUDA_TORCH_BASE TORCH_CPU_INDEX; do
  if [ -n "${!name:-}" ]; then args+=(--build-arg "$name=${!name}"); fi
done

build() {  # tag target extra-args...
  local tag="$1" target="$2"
  shift 2
  echo "[build-images] $tag (target $target $*)"
  local began=$SECONDS
  "${engine[@]}" "${args[@]}" "$@" --target "$target" -t "$tag" .
  echo "[build-images] $tag built in $((SECONDS - began)) s"
  if [ "$push" = 1 ]; then "${pusher[@]}" "$tag"; fi
}

build "$REGISTRY/largemodel-operator:$VERSION" operator
build "$REGISTRY/largemodel-runtime:$VERSION" runtime
if [ "$cpu" = 1 ]; then
  build "$REGISTRY/largemodel-runtime:$VERSION-cpu" runtime --build-arg TORCH=cpu
fi
