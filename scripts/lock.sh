#!/usr/bin/env bash
# Re-resolve requirements/lock.txt: the exact versions `make demo` and `make test` install.
#
#   scripts/lock.sh UV PYTHON_VERSION PLATFORM     (what `make lock` runs)
#
# The lock is `uv pip compile` of pyproject.toml with the dev extra and requirements/torch.in
# (torch==2.13.0). PyPI's torch wheel for Linux is the CUDA build and lists the CUDA runtime
# (nvidia-*, cuda-*) among its requirements; the CPU build installed first by scripts/venv.sh
# (TORCH_SPEC) needs none of them, so they are resolved but not written (--no-emit-package).
# After a refresh: run `make test` on it, and commit the lock with what changed.
set -euo pipefail
uv=${1:?usage: scripts/lock.sh UV PYTHON_VERSION PLATFORM}
python_version=${2:?}
platform=${3:?}
cd "$(dirname "$0")/.."
compile=("$uv" pip compile pyproject.toml requirements/torch.in --extra dev
         --python-version "$python_version" --python-platform "$platform" --quiet)
first=$(mktemp)
trap 'rm -f "$first"' EXIT
"${compile[@]}" --no-annotate --no-header -o "$first"
skip=()
for name in $(grep -oE '^(nvidia|cuda)-[A-Za-z0-9._-]+' "$first" | sort -u); do
    skip+=(--no-emit-package "$name")
done
"${compile[@]}" "${skip[@]}" --custom-compile-command "make lock" -o requirements/lock.txt
echo "requirements/lock.txt: $(grep -cE '^[A-Za-z0-9]' requirements/lock.txt) packages (${#skip[@]} CUDA runtime entries left out)"
