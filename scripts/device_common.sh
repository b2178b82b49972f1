# Sourced (from the repo root) by the prepared device scripts: installs the carried wheels (.whl/,
# made by scripts/device_wheels.sh) without network, starts $OUT/summary.txt with the commit, the
# card and jax, and defines `step NAME SECONDS COMMAND...`, which runs one step under its own time
# limit, logs it to $LOG_DIR/NAME.log (default runs/) and appends its exit code, time and the last
# $TAIL lines (default 40) of the log to the summary.
OUT=${OUT:-/tmp/device_out}
LOG_DIR=${LOG_DIR:-runs}
mkdir -p "$OUT" runs "$LOG_DIR"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
summary=$OUT/summary.txt
: > "$summary"
git log -1 --oneline 2>/dev/null | tee -a "$summary"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$summary"
python3 -c 'import jax; print("jax", jax.__version__, jax.devices())' | tee -a "$summary"

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$LOG_DIR/$name.log" 2>&1
  local rc=$?
  echo "== $name: rc=$rc in $((SECONDS - t0)) s" | tee -a "$summary"
  tail -n "${TAIL:-40}" "$LOG_DIR/$name.log" >> "$summary"
}
