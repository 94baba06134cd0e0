# Sourced by the SASS scripts: sets CUOBJDUMP to a cuobjdump that can disassemble (it runs
# nvdisasm), from PATH or from PyPI into .venv-tools (ignored), the CUDA toolkit here being
# partial. Returns non-zero if neither works (no network): callers decide whether that fails.
find_cuobjdump() {
  local tools=.venv-tools
  if command -v cuobjdump >/dev/null && command -v nvdisasm >/dev/null; then
    CUOBJDUMP=cuobjdump
    return 0
  fi
  if ! ls $tools/lib/python3*/site-packages/nvidia/cu13/bin/nvdisasm >/dev/null 2>&1; then
    { [ -x $tools/bin/pip ] || python3 -m venv $tools; } &&
      $tools/bin/pip install -q nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm >/dev/null 2>&1 || return 1
  fi
  CUOBJDUMP=$(ls $tools/lib/python3*/site-packages/nvidia/cu13/bin/cuobjdump 2>/dev/null | head -1)
  [ -n "$CUOBJDUMP" ] || return 1
  export PATH="$(dirname "$CUOBJDUMP"):$PATH"
}
