#!/usr/bin/env bash
# sd3jax on a Cloud TPU VM pod slice (every worker runs the same command; JAX finds its peers
# from the VM metadata, so no coordinator flags are needed).
#
#   launch/tpu_pod.sh create                  # a slice (or, with NUM_SLICES > 1, queued resources)
#   launch/tpu_pod.sh setup                   # copy this checkout to every worker, pip install
#   launch/tpu_pod.sh run --config experiments/sd3_medium.py --workdir gs://BUCKET/runs/x \
#       --config.mesh.fsdp=-1                 # train on all workers, logs streamed here
#   launch/tpu_pod.sh logs | stop | delete
#
# Mesh settings (devices = chips): v5p-128 = 64 chips: --config.mesh.fsdp=-1 (FSDP over the
# slice); add --config.mesh.tensor=4 only for models that do not fit with FSDP alone.
# v5e-256 / v6e-256: --config.mesh.fsdp=-1. Multi-slice (NUM_SLICES=2 of v5p-128):
# --config.mesh.fsdp=-1 --config.mesh_dcn.data=2 (data parallel across slices over DCN, FSDP
# inside each); MEGASCALE_* variables are set by the queued-resources / multislice runtime.
# The workdir must be shared by all workers (gs://...): Orbax writes checkpoints collectively,
# process 0 alone writes metrics.jsonl, TensorBoard, samples and config.json.
# Preemption: SIGTERM on any worker makes every worker save the same step and exit 75; run
# `launch/tpu_pod.sh run ...` again to resume.
set -euo pipefail

TPU_NAME="${TPU_NAME:-sd3jax}"
ZONE="${ZONE:-us-east5-a}"
PROJECT="${PROJECT:-$(gcloud config get-value project 2>/dev/null)}"
ACCELERATOR="${ACCELERATOR:-v5p-128}"
RUNTIME="${RUNTIME:-v2-alpha-tpuv5}"   # v5e: v2-alpha-tpuv5-lite; v6e: v2-alpha-tpuv6e
NUM_SLICES="${NUM_SLICES:-1}"
REMOTE_DIR="${REMOTE_DIR:-sd3jax}"
LOG="${LOG:-/tmp/sd3jax_${TPU_NAME}.log}"
GC=(gcloud --project "$PROJECT")

ssh_all() {  # ssh_all COMMAND: on every worker of every slice
  if [[ "$NUM_SLICES" -gt 1 ]]; then
    for ((s = 0; s < NUM_SLICES; s++)); do
      "${GC[@]}" compute tpus tpu-vm ssh "${TPU_NAME}-${s}" --zone "$ZONE" --worker=all \
          --command "$1" &
    done
    wait
  else
    "${GC[@]}" compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "$1"
  fi
}

scp_all() {  # scp_all SRC DST
  local names=("$TPU_NAME")
  [[ "$NUM_SLICES" -gt 1 ]] && names=($(for ((s = 0; s < NUM_SLICES; s++)); do
      echo "${TPU_NAME}-${s}"; done))
  for n in "${names[@]}"; do
    "${GC[@]}" compute tpus tpu-vm scp --zone "$ZONE" --worker=all --recurse "$1" "${n}:$2"
  done
}

cmd="${1:-}"; shift || true
case "$cmd" in
  create)
    if [[ "$NUM_SLICES" -gt 1 ]]; then
      # Multi-slice: queued resources give NUM_SLICES slices named TPU_NAME-0 ... with MEGASCALE_*.
      "${GC[@]}" compute tpus queued-resources create "$TPU_NAME" --zone "$ZONE" \
          --accelerator-type "$ACCELERATOR" --runtime-version "$RUNTIME" \
          --node-count "$NUM_SLICES" --node-prefix "$TPU_NAME"
      echo "Wait until: gcloud compute tpus queued-resources describe $TPU_NAME --zone $ZONE" \
           "shows ACTIVE."
    else
      "${GC[@]}" compute tpus tpu-vm create "$TPU_NAME" --zone "$ZONE" \
          --accelerator-type "$ACCELERATOR" --version "$RUNTIME"
    fi ;;
  setup)
    tar czf /tmp/sd3jax_src.tgz --exclude .git --exclude '*.pyc' -C "$(dirname "$0")/.." .
    scp_all /tmp/sd3jax_src.tgz "~/sd3jax_src.tgz"
    ssh_all "mkdir -p ~/${REMOTE_DIR} && tar xzf ~/sd3jax_src.tgz -C ~/${REMOTE_DIR} && \
        pip install -q -U 'jax[tpu]' && pip install -q -e ~/${REMOTE_DIR}" ;;
  run)
    # Every worker's output streams here (and to ~/sd3jax.log on the worker; `logs` re-attaches).
    args="$(printf ' %q' "$@")"
    ssh_all "cd ~/${REMOTE_DIR} && sd3jax train${args} 2>&1 | tee ~/sd3jax.log; \
        exit \${PIPESTATUS[0]}" 2>&1 | tee "$LOG" ;;
  logs)
    ssh_all "tail -n 50 -f ~/sd3jax.log" ;;
  stop)   # SIGTERM everywhere: all workers save the same step and exit 75
    ssh_all "pkill -TERM -f 'sd3jax train' || true" ;;
  delete)
    if [[ "$NUM_SLICES" -gt 1 ]]; then
      "${GC[@]}" compute tpus queued-resources delete "$TPU_NAME" --zone "$ZONE" --force --quiet
    else
      "${GC[@]}" compute tpus tpu-vm delete "$TPU_NAME" --zone "$ZONE" --quiet
    fi ;;
  *)
    sed -n '2,20p' "$0"; exit 2 ;;
esac
