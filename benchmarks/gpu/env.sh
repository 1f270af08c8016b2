# Sourced by the GPU check scripts: install the carried wheels (.whl/, e.g. megatron-core's
# cp312 wheel) into /tmp/site and set up PYTHONPATH and $OUT.
OUT="${OUT:-gpu_out}"; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site:$PWD"
fi
export PYTHONPATH="${PYTHONPATH:-}:$PWD" PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
