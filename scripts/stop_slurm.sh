#!/usr/bin/env bash
# Stop what scripts/start_slurm.sh started (daemons by their pid files; munge only if it
# started it). Cancels any jobs left in the queue first.
set -uo pipefail
dir="${ORCHESTRATOR_SLURM_DIR:-/tmp/orchestrator-slurm}"
export SLURM_CONF="$dir/slurm.conf"
[ -f "$SLURM_CONF" ] && scancel --full --quiet $(squeue -h -o %i 2>/dev/null) 2>/dev/null
for pidfile in "$dir"/slurmd-*.pid "$dir"/slurmctld.pid; do
  [ -s "$pidfile" ] || continue
  pid=$(cat "$pidfile")
  kill "$pid" 2>/dev/null
  for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null
  rm -f "$pidfile"
done
if [ -f "$dir/started_munge" ]; then
  pkill -x munged 2>/dev/null
  # a munged still shutting down would make the next start_slurm.sh fail to start its own
  for _ in $(seq 1 50); do pgrep -x munged >/dev/null || break; sleep 0.1; done
  rm -f "$dir/started_munge"
fi
exit 0
