#!/usr/bin/env bash
# Create or reuse a virtual environment and install specbatch into it; what `make demo`,
# `make test` and `make test-latest` run first.
#
#   scripts/venv.sh VENV lock      torch (TORCH_SPEC), then exactly requirements/lock.txt, then
#                                  specbatch itself with --no-deps: the tested versions
#   scripts/venv.sh VENV latest    torch (TORCH_SPEC), then specbatch[dev] at the newest releases
#                                  its ranges in pyproject.toml admit: the upgrade check
#
# Every step's pip output goes to VENV/install.log; a step that fails stops here with one line
# naming the step and pip's own error, and the environment is then checked by importing what
# a job imports (python -m specbatch.deps), so a broken install never reaches a Ray actor.
set -uo pipefail

venv=${1:?usage: scripts/venv.sh VENV lock|latest}
mode=${2:?usage: scripts/venv.sh VENV lock|latest}
py=${PY:-python3}
torch_spec=${TORCH_SPEC:-torch==2.13.0}
here=$(cd "$(dirname "$0")/.." && pwd)
log="$venv/install.log"

fail() {  # fail STEP: one line, pip's first error (cut to 240 characters), where the rest is
    local why
    why=$(grep -E '^(ERROR|error):' "$log" 2>/dev/null | head -n 1 | cut -c1-240)
    [ -n "$why" ] || why=$(grep -v '^WARNING' "$log" 2>/dev/null | grep -v '^\s*$' | tail -n 1)
    echo "error: $1 failed${why:+: $why} (full log: $log)" >&2
    exit 1
}

step() {  # step NAME CMD...: run CMD with its output appended to the log
    local name=$1; shift
    echo "== $name: $*" >>"$log"
    "$@" >>"$log" 2>&1 || fail "$name"
}

mkdir -p "$venv" && : >"$log"
if [ ! -x "$venv/bin/python" ]; then
    "$py" -m venv "$venv" >>"$log" 2>&1 || fail "creating the virtual environment $venv with $py"
fi
pip=("$venv/bin/python" -m pip install --disable-pip-version-check)
step "upgrading pip" "${pip[@]}" --upgrade pip
# torch first and alone: a bare `torch` requirement can pull a multi-GB CUDA build.
# shellcheck disable=SC2086  # TORCH_SPEC may carry pip options (an index URL)
step "installing torch ($torch_spec)" "${pip[@]}" $torch_spec
case "$mode" in
    lock)
        step "installing the lock (requirements/lock.txt)" "${pip[@]}" -r "$here/requirements/lock.txt"
        step "installing specbatch" "${pip[@]}" --no-deps -e "$here"
        ;;
    latest)
        # every other package at its newest release; torch stays the build installed above
        pin="$venv/torch-pin.txt"
        "$venv/bin/python" -c 'import torch; print("torch==" + torch.__version__)' >"$pin" 2>>"$log" || fail "importing torch"
        step "installing specbatch[dev] at the newest releases" "${pip[@]}" --upgrade --upgrade-strategy eager -c "$pin" -e "$here[dev]"
        ;;
    *) echo "error: scripts/venv.sh: mode must be lock or latest, got '$mode'" >&2; exit 2 ;;
esac
"$venv/bin/python" -m specbatch.deps || exit 1
