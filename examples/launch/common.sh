# Shared by the launch scripts in this directory (sourced, not run).
#
# Every script takes:   [--dry-run] [--config FILE.yaml] [--set KEY=VALUE ...] (nothing else:
#                       a mistyped flag is refused, never passed on or ignored)
# and these variables:  PYTHON (python with megatron_adadpo; default: python), GPU (planner GPU
#                       kind: h100 | h200 | a100 | ...; default h100), GPUS_PER_NODE (default 8),
#                       DRY_RUN=1 (same as --dry-run), PLAN_CHECK=0 (skip the pre-launch plan),
#                       FORCE=1 (launch even when the planner says the layout does not fit),
#                       DISTRIBUTED_TIMEOUT_MINUTES (collective timeout: passed as
#                       --set train.distributed_timeout_minutes=N before the user's --set).
# A dry run prints the resolved launch command and the planner's layout and memory plan, and
# exits with the planner's status (0 fits, 1 does not fit, 2 layout refused). A real launch runs
# the planner first and refuses a layout that cannot run (status 2) or does not fit (status 1).

set -euo pipefail

PYTHON=${PYTHON:-python}
GPU=${GPU:-h100}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
DRY_RUN=${DRY_RUN:-0}
# The training entry point; ADADPO_ENTRY exists only so tests can launch a stand-in module.
ENTRY=${ADADPO_ENTRY:-megatron_adadpo.train}
# Megatron orders TP/SP communication and compute kernels on one hardware queue.
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}

die() {
    echo "$SCRIPT: $*" >&2
    exit 64
}

# parse_args "$@": sets CONFIG, DRY_RUN, TRAIN_ARGS (for train.py) and PLAN_SETS (for plan.py).
parse_args() {
    TRAIN_ARGS=()
    PLAN_SETS=()
    if [[ -n "${DISTRIBUTED_TIMEOUT_MINUTES:-}" ]]; then
        require_int DISTRIBUTED_TIMEOUT_MINUTES
        TRAIN_ARGS+=(--set "train.distributed_timeout_minutes=$DISTRIBUTED_TIMEOUT_MINUTES")
    fi
    while (($#)); do
        case "$1" in
            --dry-run) DRY_RUN=1; shift ;;
            --config) (($# >= 2)) || die "--config needs a file"; CONFIG=$2; shift 2 ;;
            --set) (($# >= 2)) || die "--set needs KEY=VALUE"
                   TRAIN_ARGS+=(--set "$2"); PLAN_SETS+=(--set "$2"); shift 2 ;;
            *) die "unknown argument '$1'; accepted: --dry-run, --config FILE.yaml, --set KEY=VALUE" ;;
        esac
    done
    [[ -n "${CONFIG:-}" ]] || die "no config: pass --config FILE.yaml or set CONFIG"
    [[ -f "$CONFIG" ]] || die "config file $CONFIG does not exist"
}

# require VAR...: exit naming every variable that is unset or empty.
require() {
    local missing=() v
    for v in "$@"; do
        [[ -n "${!v:-}" ]] || missing+=("$v")
    done
    ((${#missing[@]} == 0)) || die "required variable(s) not set: ${missing[*]}"
}

# require_int VAR...: each is a positive integer.
require_int() {
    local v
    for v in "$@"; do
        [[ "${!v}" =~ ^[1-9][0-9]*$ ]] || die "$v=${!v} must be a positive integer"
    done
}

# plan NODES [extra plan.py args]: the planner for this config on NODES x GPUS_PER_NODE GPUs.
plan() {
    local nodes=$1
    shift
    "$PYTHON" "$REPO/tools/plan.py" --recipe "$CONFIG" --gpu "$GPU" --nodes "$nodes" \
        --gpus-per-node "$GPUS_PER_NODE" ${GPUS:+--gpus "$GPUS"} \
        ${PLAN_SETS[@]+"${PLAN_SETS[@]}"} "$@"
}

# preflight NODES CMD...: dry run: print CMD and the plan, exit with the plan's status.
# Otherwise check the plan (unless PLAN_CHECK=0) and return so the caller launches.
preflight() {
    local nodes=$1 rc=0 out
    shift
    if [[ "$DRY_RUN" == 1 ]]; then
        echo "== launch (dry run; not started) =="
        printf '%q ' "$@"
        echo
        echo "== plan: $nodes node(s) x $GPUS_PER_NODE GPU(s), $GPU =="
        plan "$nodes" || rc=$?
        exit "$rc"
    fi
    [[ "${PLAN_CHECK:-1}" == 0 ]] && return 0
    out=$(plan "$nodes" --no-suggest 2>&1) || rc=$?
    if ((rc == 2)); then
        echo "$out" >&2
        die "layout refused before launch (see the reason above)"
    elif ((rc == 1)) && [[ "${FORCE:-0}" != 1 ]]; then
        echo "$out" >&2
        die "the planner says this layout does not fit $GPU memory; run with --dry-run for" \
            "suggestions, or FORCE=1 to launch anyway"
    elif ((rc != 0 && rc != 1)); then
        echo "$out" >&2
        die "the planner failed (status $rc)"
    fi
}
