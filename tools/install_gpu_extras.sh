#!/usr/bin/env bash
# Build and install the GPU extras of the megablocks backend against the torch already installed:
#   stanford-stk 0.7.1, grouped-gemm 0.3.0, megablocks 0.10.0.
# Usage: bash tools/install_gpu_extras.sh [--wheelhouse DIR] [--jobs N]
#   --wheelhouse DIR  offline: take the sdists from DIR (e.g. what `pip download --no-deps --no-binary :all:` saved)
#                     instead of the package index.
# Always --no-deps --no-build-isolation: megablocks pins torch==2.7.0 and grouped-gemm builds against torch<2.8, so
# anything else would replace or mismatch your torch. On CUDA >= 13, CUB dropped the `debug_synchronous` argument that
# megablocks' csrc/cumsum.h passes; the script removes it from a private copy of the source, only when needed.
# Env: TORCH_CUDA_ARCH_LIST (default: the visible GPUs' archs, else "8.0;9.0"), PIP_EXTRA_ARGS (e.g. --target DIR).
set -euo pipefail

wheelhouse=""
jobs="${MAX_JOBS:-$(nproc)}"
while [ $# -gt 0 ]; do
  case "$1" in
    --wheelhouse) wheelhouse="${2:?--wheelhouse needs a folder}"; shift 2 ;;
    --jobs) jobs="${2:?--jobs needs a number}"; shift 2 ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "install_gpu_extras.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done

py=${PYTHON:-python3}
cuda=$("$py" -c 'import torch; print(torch.version.cuda or "")')
if [ -z "$cuda" ]; then
  echo "install_gpu_extras.sh: torch $("$py" -c 'import torch; print(torch.__version__)') is a CPU build; install a CUDA build of torch first" >&2
  exit 2
fi
command -v nvcc >/dev/null || { echo "install_gpu_extras.sh: nvcc not found; put the CUDA toolkit's bin on PATH (CUDA_HOME)" >&2; exit 2; }
nvcc_major=$(nvcc --version | sed -n 's/.*release \([0-9]*\)\..*/\1/p')
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST=$("$py" -c 'import torch
caps = sorted({"%d.%d" % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
print(";".join(caps) or "8.0;9.0")')
fi
export TORCH_CUDA_ARCH_LIST MAX_JOBS="$jobs"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
pip_args=(--no-deps --no-build-isolation --no-cache-dir ${PIP_EXTRA_ARGS:-})

sdist() {  # sdist NAME VERSION -> path of the .tar.gz
  local name=$1 version=$2 file pattern
  pattern="${name//-/[-_]}-$version.tar.gz"  # index file names use '-' or '_'
  if [ -n "$wheelhouse" ]; then
    file=$(ls "$wheelhouse"/$pattern 2>/dev/null | head -n 1)
    [ -n "$file" ] || { echo "install_gpu_extras.sh: no ${name}-${version}.tar.gz in $wheelhouse" >&2; exit 2; }
  else
    "$py" -m pip download -q --no-deps --no-build-isolation --no-binary :all: -d "$work" "$name==$version" >&2
    file=$(ls "$work"/$pattern | head -n 1)
  fi
  echo "$file"
}

echo "== torch $("$py" -c 'import torch; print(torch.__version__)'), nvcc CUDA $nvcc_major, archs $TORCH_CUDA_ARCH_LIST, $jobs jobs"
stk=$(sdist stanford-stk 0.7.1) || exit 2
gg=$(sdist grouped-gemm 0.3.0) || exit 2
mb=$(sdist megablocks 0.10.0) || exit 2
"$py" -m pip install -q "${pip_args[@]}" "$stk"
tar -xzf "$mb" -C "$work"
mb_src="$work/megablocks-0.10.0"
if [ "$nvcc_major" -ge 13 ] && grep -q debug_synchronous "$mb_src/csrc/cumsum.h"; then
  perl -0pi -e 's/stream,\s*debug_synchronous\)\)/stream))/g' "$mb_src/csrc/cumsum.h"
  echo "== CUDA $nvcc_major: removed debug_synchronous from megablocks csrc/cumsum.h (CUB >= 3 no longer takes it)"
fi

# The two CUDA builds are independent: run them side by side, each with half the cores.
half=$(( jobs > 1 ? jobs / 2 : 1 ))
start=$(date +%s)
MAX_JOBS=$half "$py" -m pip install -q "${pip_args[@]}" "$gg" > "$work/grouped_gemm.log" 2>&1 & gg_pid=$!
MAX_JOBS=$half "$py" -m pip install -q "${pip_args[@]}" "$mb_src" > "$work/megablocks.log" 2>&1 & mb_pid=$!
status=0
wait $gg_pid || { echo "grouped-gemm build failed:" >&2; tail -n 30 "$work/grouped_gemm.log" >&2; status=1; }
wait $mb_pid || { echo "megablocks build failed:" >&2; tail -n 30 "$work/megablocks.log" >&2; status=1; }
[ $status -eq 0 ] || exit 1
echo "== built grouped-gemm and megablocks in $(( $(date +%s) - start )) s"

cd "$work"  # not the source tree, so the installed packages are imported
"$py" - <<'PY'
import importlib.metadata as md
import grouped_gemm, megablocks.ops, stk  # noqa: F401  - importing proves the CUDA extensions load
for name in ("stanford-stk", "grouped_gemm", "megablocks"):
    print(f"== installed {name} {md.version(name)}")
PY
