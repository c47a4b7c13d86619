#!/usr/bin/env bash
# Start a real Slurm cluster on this machine: munge, slurmctld and N slurmd daemons that emulate
# nodes (NodeHostname=localhost, one port each; their names are added to /etc/hosts as 127.0.0.1
# when they do not resolve). Idempotent: what already runs is left alone.
# Prints `export SLURM_CONF=...`; scripts/stop_slurm.sh stops what this started.
#   ORCHESTRATOR_SLURM_DIR (default /tmp/orchestrator-slurm), ORCHESTRATOR_SLURM_NODES (default 2)
set -euo pipefail
# the daemons live in sbin, which a user's plain PATH (/usr/local/bin:/usr/bin:/bin) lacks
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"
dir="${ORCHESTRATOR_SLURM_DIR:-/tmp/orchestrator-slurm}"
nodes="${ORCHESTRATOR_SLURM_NODES:-2}"
conf="$dir/slurm.conf"

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
  echo "start_slurm: installing slurmctld, slurmd, slurm-client, munge (apt)" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null
fi

mkdir -p "$dir/state" "$dir/log"
if [ ! -s /etc/munge/munge.key ]; then
  mkdir -p /etc/munge
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  chown munge:munge /etc/munge/munge.key 2>/dev/null || true
  chmod 400 /etc/munge/munge.key
fi
if ! pgrep -x munged >/dev/null; then
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
  if id munge >/dev/null 2>&1; then
    runuser -u munge -- /usr/sbin/munged 2>/dev/null || /usr/sbin/munged --force
  else
    /usr/sbin/munged --force
  fi
  touch "$dir/started_munge"
fi

node_lines=""
node_names=""
for i in $(seq 1 "$nodes"); do
  node_lines+="NodeName=node$i NodeHostname=localhost NodeAddr=127.0.0.1 Port=$((17000 + i)) CPUs=1 RealMemory=4000 State=UNKNOWN"$'\n'
  node_names+="${node_names:+,}node$i"
  mkdir -p "$dir/spool/node$i"
  # Jobs rendezvous on the first node by the name Slurm lists (node1), as on a real cluster
  # where that name is the node's hostname: make the emulated names resolve to this machine.
  if ! getent hosts "node$i" >/dev/null; then
    echo "127.0.0.1 node$i  # orchestrator test cluster (scripts/start_slurm.sh)" >>/etc/hosts \
      || { echo "start_slurm: cannot add node$i to /etc/hosts (needs root)" >&2; exit 1; }
  fi
done
cat > "$conf.tmp" <<CONF
# Written by scripts/start_slurm.sh: $nodes emulated nodes on this host.
ClusterName=orchestrator
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=16817
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MinJobAge=3600
KillWait=10
# A requeued job may start again cred_expire+1 s after its requeue (default 120 s); the
# checkpoint-on-signal test requeues jobs
AuthInfo=cred_expire=10
$node_lines
PartitionName=debug Nodes=$node_names Default=YES MaxTime=INFINITE State=UP
CONF
mv "$conf.tmp" "$conf"
export SLURM_CONF="$conf"

alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
alive "$dir/slurmctld.pid" || slurmctld -f "$conf"
for i in $(seq 1 "$nodes"); do
  alive "$dir/slurmd-node$i.pid" || slurmd -f "$conf" -N "node$i"
done

for _ in $(seq 1 60); do
  idle=$(sinfo -h -N -o "%T" 2>/dev/null | grep -c "idle" || true)
  [ "$idle" -ge "$nodes" ] && break
  sleep 1
done
if [ "${idle:-0}" -lt "$nodes" ]; then
  echo "start_slurm: only ${idle:-0} of $nodes nodes came up; see $dir/log" >&2
  sinfo >&2 || true
  exit 1
fi
echo "export SLURM_CONF=$conf"
