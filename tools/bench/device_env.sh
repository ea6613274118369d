# Sourced by the GPU scripts (lean_step_gpu.sh, paper_study_gpu.sh) from the repository root
# "$root": megatron-core (and other wheels in .whl/, carried to the device machine) are
# installed into /tmp/site unless PYTHON names an interpreter to use as it is; the kernels are
# importable as transmamba_kernels through a link (no install); sets $py.
if [ -z "${PYTHON:-}" ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
mkdir -p /tmp/mtm_packages && ln -sfn "$root/kernels" /tmp/mtm_packages/transmamba_kernels
export PYTHONPATH="/tmp/mtm_packages:$root${PYTHONPATH:+:$PYTHONPATH}" MTM_SKIP_SETUP=1 PYTHONUNBUFFERED=1
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-/tmp/triton_cache}"
py="${PYTHON:-python3}"
