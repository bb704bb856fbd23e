#!/usr/bin/env bash
# Run N jdistill processes on this machine (CPU, 127.0.0.1 coordinator) to exercise the
# multi-host code paths: jax.distributed, per-process data shards, global batches, Orbax
# multi-process checkpoints.
#
#   bash launch/local_multiprocess.sh --config=configs/teacher.py:digits --workdir=runs/mp \
#       --config.train.num_steps=200
#
# Arguments go to every process's `python -m jdistill.main` (plus the coordinator flags).
# Environment:
#   NUM_PROCESSES         processes to start (default: 2)
#   DEVICES_PER_PROCESS   CPU devices each process sees (default: 1)
#   PORT                  coordinator port on 127.0.0.1 (default: a random one in 20000-39999)
#   LOG_DIR               one log per process, process_<i>.log (default: a new temp dir);
#                         process 0's log is also streamed to stdout
#   PYTHON                interpreter (default: .venv/bin/python if present, else python)
# Exits non-zero if any process fails; the others are then stopped.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NUM_PROCESSES="${NUM_PROCESSES:-2}"
DEVICES_PER_PROCESS="${DEVICES_PER_PROCESS:-1}"
PORT="${PORT:-$((20000 + RANDOM % 20000))}"
LOG_DIR="${LOG_DIR:-$(mktemp -d -t jdistill-mp.XXXXXX)}"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python; fi
fi

if (($# == 0)); then
  sed -n '2,17p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
  exit 2
fi
[[ "$NUM_PROCESSES" =~ ^[1-9][0-9]*$ ]] || { echo "NUM_PROCESSES must be a positive integer" >&2; exit 2; }
[[ "$DEVICES_PER_PROCESS" =~ ^[1-9][0-9]*$ ]] || { echo "DEVICES_PER_PROCESS must be a positive integer" >&2; exit 2; }
mkdir -p "$LOG_DIR"
cd "$ROOT"

pids=()
tail_pid=""
stop_all() {
  local pid
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  if [[ -n "$tail_pid" ]]; then kill "$tail_pid" 2>/dev/null || true; fi
}
trap 'stop_all; exit 130' INT TERM

echo "local_multiprocess: $NUM_PROCESSES process(es) x $DEVICES_PER_PROCESS CPU device(s), coordinator 127.0.0.1:$PORT, logs in $LOG_DIR"
for ((i = 0; i < NUM_PROCESSES; i++)); do
  JAX_PLATFORMS=cpu \
  XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$DEVICES_PER_PROCESS" \
    "$PYTHON" -m jdistill.main "$@" --distributed --coordinator_address="127.0.0.1:$PORT" \
      --num_processes="$NUM_PROCESSES" --process_id="$i" </dev/null >"$LOG_DIR/process_$i.log" 2>&1 &
  pids+=("$!")
done
tail -n +1 -F "$LOG_DIR/process_0.log" 2>/dev/null &
tail_pid=$!

# Reap processes as they finish; on the first failure stop the rest (they would otherwise wait in
# a collective until the coordination service times out).
status=()  # exit status by process index, set once it has been reaped
failed=0
while ((${#status[@]} < NUM_PROCESSES)); do
  for i in "${!pids[@]}"; do
    if [[ -n "${status[$i]:-}" ]]; then continue; fi
    if ! kill -0 "${pids[$i]}" 2>/dev/null; then
      if wait "${pids[$i]}"; then status[i]=0; else status[i]=$?; fi
      if ((status[i] != 0 && !failed)); then
        failed=1
        echo "local_multiprocess: process $i exited with status ${status[$i]}; stopping the others" >&2
        stop_all
      fi
    fi
  done
  sleep 0.5
done
sleep 0.5  # let tail print process 0's last lines
kill "$tail_pid" 2>/dev/null || true
wait "$tail_pid" 2>/dev/null || true

rc=0
for ((i = 0; i < NUM_PROCESSES; i++)); do
  echo "local_multiprocess: process $i exit status ${status[$i]} ($LOG_DIR/process_$i.log)"
  if ((status[i] != 0)); then
    rc=1
    if ((i != 0)); then
      echo "----- last lines of process_$i.log -----"
      tail -n 20 "$LOG_DIR/process_$i.log"
    fi
  fi
done
exit "$rc"
