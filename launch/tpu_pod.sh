#!/usr/bin/env bash
# Launch jdistill on a Cloud TPU VM or pod slice (every worker runs one process).
#
#   TPU_NAME=my-tpu ZONE=us-central2-b bash launch/tpu_pod.sh setup
#   TPU_NAME=my-tpu ZONE=us-central2-b bash launch/tpu_pod.sh run \
#       --config=configs/teacher.py:cifar10 --workdir=gs://BUCKET/runs/teacher-cifar10 [--config.x=y ...]
#   TPU_NAME=my-tpu ZONE=us-central2-b bash launch/tpu_pod.sh logs
#   TPU_NAME=my-tpu ZONE=us-central2-b bash launch/tpu_pod.sh stop
#
# Environment:
#   TPU_NAME   (required) name of the TPU VM / pod slice
#   ZONE       (required) its zone
#   PROJECT    GCP project (default: gcloud's configured project)
#   REPO_DIR   where the code lives on each worker (default: ~/jdistill)
#   PYTHON     interpreter for the workers' venv (default: python3.11, apt-installed with
#              python3.11-venv if it cannot make a venv). jdistill needs Python >= 3.11.
#   GIT_REF    what `setup` ships (default: HEAD plus uncommitted changes to tracked files;
#              untracked files are not shipped)
#   RUN_NAME   log file prefix for `run` (default: a UTC timestamp)
#   WORKER     worker whose log `logs` tails (default: 0); TAIL_LINES: history shown (default: 100)
#   DRY_RUN=1  print the commands instead of running them
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REPO_DIR="${REPO_DIR:-~/jdistill}"
PYTHON="${PYTHON:-python3.11}"
DRY_RUN="${DRY_RUN:-0}"
# Matches the training processes but not the shells whose command line mentions them.
PROC_PATTERN='^[^ ]*python[^ ]* -m jdistill[.]main'

usage() {
  sed -n '2,20p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
  echo
  echo "usage: $(basename "$0") {setup|run [jdistill.main args...]|logs|stop}"
}

die() { echo "tpu_pod.sh: $*" >&2; exit 1; }

# One word as bash input: as is when plain, else in single quotes.
shquote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# Runs a command, or prints it (quoted, copy-pasteable) when DRY_RUN=1.
cmd() {
  if [[ "$DRY_RUN" == 1 ]]; then
    local word sep=""
    for word in "$@"; do printf '%s%s' "$sep" "$(shquote "$word")"; sep=" "; done
    echo
  else
    "$@"
  fi
}

require_tpu() {
  [[ -n "${TPU_NAME:-}" ]] || die "set TPU_NAME (and ZONE)"
  [[ -n "${ZONE:-}" ]] || die "set ZONE"
  GCLOUD_FLAGS=(--zone="$ZONE")
  if [[ -n "${PROJECT:-}" ]]; then GCLOUD_FLAGS+=(--project="$PROJECT"); fi
}

# REPO_DIR as a word for the remote shell: a leading ~/ becomes "$HOME"/ (expanded remotely).
# shellcheck disable=SC2016,SC2088  # both are deliberate: "$HOME" and ~ are for the remote side
remote_dir() {
  if [[ "$REPO_DIR" == "~" ]]; then
    printf '"$HOME"'
  elif [[ "$REPO_DIR" == "~/"* ]]; then
    printf '"$HOME"/%q' "${REPO_DIR#\~/}"
  else
    printf '%q' "$REPO_DIR"
  fi
}

ssh_workers() {  # ssh_workers WORKER REMOTE_COMMAND
  cmd gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${GCLOUD_FLAGS[@]}" --worker="$1" --command="$2"
}

TMP_DIR=""
cleanup() { if [[ -n "$TMP_DIR" ]]; then rm -rf "$TMP_DIR"; fi; }
trap cleanup EXIT

do_setup() {
  require_tpu
  local dir ref tarball py remote
  dir="$(remote_dir)"
  py="$(printf %q "$PYTHON")"
  TMP_DIR="$(mktemp -d)"
  tarball="$TMP_DIR/jdistill.tar.gz"
  if [[ -n "${GIT_REF:-}" ]]; then
    ref="$GIT_REF"
  elif [[ "$DRY_RUN" == 1 ]]; then
    ref=HEAD  # a real run ships $(git stash create) when tracked files have uncommitted changes
  else
    ref="$(git -C "$ROOT" stash create)"  # a commit of the working tree; empty when it is clean
    ref="${ref:-HEAD}"
  fi
  cmd git -C "$ROOT" archive --format=tar.gz -o "$tarball" "$ref"
  cmd gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:/tmp/jdistill.tar.gz" \
    "${GCLOUD_FLAGS[@]}" --worker=all
  # Replace the sources (keeping .venv and logs), make the venv (installing Python if that
  # fails), install jdistill with jax[tpu].
  remote="set -euo pipefail; mkdir -p $dir; cd $dir; rm -rf jdistill configs"
  remote+="; tar -xzf /tmp/jdistill.tar.gz; rm -f /tmp/jdistill.tar.gz"
  remote+="; [ -x .venv/bin/python ] || $py -m venv .venv || { rm -rf .venv"
  remote+="; sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $py $py-venv"
  remote+=" && $py -m venv .venv; }"
  remote+="; .venv/bin/pip install -q -U pip; .venv/bin/pip install -q -e \".[tpu]\""
  remote+="; echo -n \"\$(hostname): jdistill installed, jax \"; .venv/bin/python -c \"import jax; print(jax.__version__)\""
  ssh_workers all "$remote"
}

do_run() {
  require_tpu
  (($#)) || die "run: pass jdistill.main flags, e.g. --config=configs/teacher.py:cifar10 --workdir=gs://BUCKET/run"
  local arg prev="" shared=0
  for arg in "$@"; do
    if [[ "$arg" == --workdir=gs://* || ( "$prev" == --workdir && "$arg" == gs://* ) ]]; then shared=1; fi
    prev="$arg"
  done
  ((shared)) || echo "tpu_pod.sh: note: on a multi-host slice --workdir must be shared by all workers (gs://...)" >&2
  local dir run_name args remote
  dir="$(remote_dir)"
  run_name="${RUN_NAME:-$(date -u +%Y%m%d-%H%M%S)}"
  args="$(printf '%q ' "$@")"
  remote="set -euo pipefail; cd $dir; mkdir -p logs"
  remote+="; if pgrep -f \"$PROC_PATTERN\" >/dev/null; then echo \"\$(hostname): jdistill is already running (tpu_pod.sh stop)\" >&2; exit 1; fi"
  remote+="; w=\$(curl -sf -H \"Metadata-Flavor: Google\" http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number || hostname)"
  remote+="; log=logs/$(printf %q "$run_name").worker\$w.log; ln -sfn \"\${log#logs/}\" logs/latest.log"
  remote+="; nohup \"\$PWD/.venv/bin/python\" -m jdistill.main $args--distributed </dev/null >\"\$log\" 2>&1 &"
  remote+=" echo \"\$(hostname) (worker \$w): started, log\" $dir/\"\$log\""
  ssh_workers all "$remote"
}

do_logs() {
  require_tpu
  ssh_workers "${WORKER:-0}" "tail -n $(printf %q "${TAIL_LINES:-100}") -F $(remote_dir)/logs/latest.log"
}

do_stop() {
  require_tpu
  local remote
  remote="pkill -TERM -f \"$PROC_PATTERN\" || true"
  remote+="; for i in \$(seq 30); do pgrep -f \"$PROC_PATTERN\" >/dev/null || break; sleep 1; done"
  remote+="; pkill -KILL -f \"$PROC_PATTERN\" || true; echo \"\$(hostname): stopped\""
  ssh_workers all "$remote"
}

case "${1:-}" in
  setup) shift; do_setup "$@" ;;
  run) shift; do_run "$@" ;;
  logs) shift; do_logs "$@" ;;
  stop) shift; do_stop "$@" ;;
  -h|--help|help) usage ;;
  *) usage >&2; exit 2 ;;
esac
