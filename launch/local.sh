#!/usr/bin/env bash
# Starts N sd3jax processes on this machine, each with D fake CPU devices, joined into one JAX
# runtime over localhost (gloo collectives). For tests and for trying multi-host code paths.
#
#   launch/local.sh [-n NUM_PROCESSES] [-d DEVICES_PER_PROCESS] [-l LOG_DIR] [-p PORT] -- \
#       train --config experiments/tiny.py --workdir /tmp/mh
#
# Mesh: the job sees N x D devices, e.g. `--config.mesh.data=-1` (data parallel) or
# `--config.mesh.fsdp=-1` with experiments/tiny.py:fsdp.
# Logs go to LOG_DIR/process_I.log (default: stdout, prefixed), pids to LOG_DIR/process_I.pid.
# Exit code: the processes' common code (0 done, 75 interrupted and saved); otherwise the first
# failing one. A process that fails (not 0 / 75) takes the others down after GRACE_S seconds, so
# a peer stuck in a collective does not hang the job.
set -uo pipefail

NUM=2; DEVICES=4; LOG_DIR=""; PORT=""; GRACE_S="${GRACE_S:-30}"
while getopts "n:d:l:p:" opt; do
  case "$opt" in
    n) NUM="$OPTARG" ;; d) DEVICES="$OPTARG" ;; l) LOG_DIR="$OPTARG" ;; p) PORT="$OPTARG" ;;
    *) echo "usage: $0 [-n N] [-d D] [-l LOG_DIR] [-p PORT] -- COMMAND ARGS..." >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
[[ "${1:-}" == "--" ]] && shift
[[ $# -ge 1 ]] || { echo "$0: give the sd3jax command, e.g. -- train --config ..." >&2; exit 2; }

if [[ -z "$PORT" ]]; then
  PORT="$(python -c 'import portpicker; print(portpicker.pick_unused_port())' 2>/dev/null ||
          python -c 'import socket; s=socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')"
fi
SD3JAX=(sd3jax)
command -v sd3jax >/dev/null || SD3JAX=(python -m sd3jax.cli)
[[ -n "$LOG_DIR" ]] && mkdir -p "$LOG_DIR"

export JAX_PLATFORMS=cpu
XLA_FLAGS="$(echo "${XLA_FLAGS:-}" | sed -E 's/--xla_force_host_platform_device_count=[0-9]+//g')"
export XLA_FLAGS="${XLA_FLAGS} --xla_force_host_platform_device_count=${DEVICES}"

pids=()
for ((i = 0; i < NUM; i++)); do
  args=("$@" "--coordinator_address=localhost:${PORT}" "--num_processes=${NUM}"
        "--process_id=${i}")
  if [[ -n "$LOG_DIR" ]]; then
    "${SD3JAX[@]}" "${args[@]}" >"${LOG_DIR}/process_${i}.log" 2>&1 &
    echo $! >"${LOG_DIR}/process_${i}.pid"
  else
    "${SD3JAX[@]}" "${args[@]}" > >(sed -u "s/^/[${i}] /") 2>&1 &
  fi
  pids+=($!)
done

# Forward SIGTERM / SIGINT to every process (a preemption of the whole job).
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM INT

codes=()
failed=""
remaining=${#pids[@]}
while ((remaining > 0)); do
  for i in "${!pids[@]}"; do
    [[ -n "${codes[$i]:-}" ]] && continue
    if ! kill -0 "${pids[$i]}" 2>/dev/null; then
      wait "${pids[$i]}"; codes[$i]=$?
      remaining=$((remaining - 1))
      if [[ "${codes[$i]}" != 0 && "${codes[$i]}" != 75 && -z "$failed" ]]; then
        failed="$i"; deadline=$((SECONDS + GRACE_S))
        echo "$0: process $i exited with ${codes[$i]}; stopping the others in ${GRACE_S}s." >&2
      fi
    fi
  done
  if [[ -n "$failed" ]] && ((SECONDS >= deadline)); then
    for i in "${!pids[@]}"; do
      [[ -z "${codes[$i]:-}" ]] && kill -KILL "${pids[$i]}" 2>/dev/null
    done
  fi
  ((remaining > 0)) && sleep 0.5
done

echo "$0: exit codes ${codes[*]}" >&2
[[ -n "$failed" ]] && exit "${codes[$failed]}"
for c in "${codes[@]}"; do [[ "$c" != "${codes[0]}" ]] && exit 1; done
exit "${codes[0]}"
