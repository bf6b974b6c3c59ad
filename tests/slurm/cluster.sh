#!/usr/bin/env bash
# A real one-node Slurm cluster on localhost for the tests: eight fake GPUs (so the test
# scenarios can run side by side), a `cpu` and a `gpu` partition (the names profiles/slurm uses), no accounting daemon.
#
#   tests/slurm/cluster.sh start   configure, start, wait for idle (`make setup-system`
#                                  installs Slurm and munge first)
#   tests/slurm/cluster.sh stop    stop the daemons this script started, by PID, and put
#                                  back the machine's own Slurm config
#
# VLMFLOW_SLURM_MAX_JOBS=N caps the jobs the controller holds (MaxJobCount: pending,
# running and finished ones kept for VLMFLOW_SLURM_MIN_JOB_AGE seconds, default 3600), as
# a cluster that caps jobs does; sbatch past the cap retries for 2 minutes, then fails.
#
# Needs root (it writes /etc/slurm, /etc/munge and /dev/fake-gpu*). The config must sit at
# /etc/slurm/slurm.conf: the executor plugin strips SLURM_* variables inside jobs, so a
# SLURM_CONF pointing elsewhere would break the inner srun. So start keeps the machine's
# own slurm.conf, gres.conf and cgroup.conf aside, and stop puts them back (or removes
# the test's, if the machine had none). A test config left behind would point every later
# scontrol at a controller that is gone: the Slurm executor plugin's scontrol call would
# then add its 10 s timeout to the start-up of every Snakemake on the machine.
set -euo pipefail

STATE=${VLMFLOW_SLURM_STATE:-/tmp/vlmflow-slurm}
PIDS="$STATE/pids"
SAVED="$STATE/etc-slurm"
CONFIG_FILES="slurm.conf gres.conf cgroup.conf"
# The first line of the test's slurm.conf: how stop and start tell it from the machine's.
TEST_CLUSTER="ClusterName=vlmflow-test"

install() {
  if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    echo "slurmctld / munged missing: install them with \`make setup-system\` (as root)" >&2
    exit 1
  fi
}

test_config_in_place() {
  grep -qx "$TEST_CLUSTER" /etc/slurm/slurm.conf 2>/dev/null
}

save_machine_config() {
  mkdir -p "$SAVED"
  # A test config here was left by a run of this script from before it restored
  # configs: there is nothing of the machine's to keep.
  if test_config_in_place; then
    return 0
  fi
  # mv, not cp: a config that is a symlink (to a shared file system, say) moves aside
  # as the link, and the test's config is written as a new file, not through the link.
  for name in $CONFIG_FILES; do
    if [ -e "/etc/slurm/$name" ] || [ -L "/etc/slurm/$name" ]; then
      mv "/etc/slurm/$name" "$SAVED/$name"
    fi
  done
}

restore_machine_config() {
  if [ ! -d "$SAVED" ] && ! test_config_in_place; then
    return 0
  fi
  for name in $CONFIG_FILES; do
    if [ -e "$SAVED/$name" ] || [ -L "$SAVED/$name" ]; then
      mv -f "$SAVED/$name" "/etc/slurm/$name"
    else
      rm -f "/etc/slurm/$name"
    fi
  done
  rm -rf "$SAVED"
}

configure() {
  mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm "$STATE"
  save_machine_config
  # Slurm only sets CUDA_VISIBLE_DEVICES for GPUs backed by character devices.
  for n in 0 1 2 3 4 5 6 7; do
    [ -c "/dev/fake-gpu$n" ] || { rm -f "/dev/fake-gpu$n"; mknod "/dev/fake-gpu$n" c 1 3; }
  done
  # The node advertises more CPUs and memory than this machine has (config_overrides),
  # so the repo's own profile (8 CPUs per GPU, 64 GB) schedules here unchanged.
  cat >/etc/slurm/slurm.conf <<CONF
$TEST_CLUSTER
SlurmctldHost=localhost
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SlurmdParameters=config_overrides
GresTypes=gpu
ReturnToService=2
# squeue must still see finished jobs when Snakemake asks (no accounting here), and
# the tests read every job of a scenario back from scontrol.
MinJobAge=${VLMFLOW_SLURM_MIN_JOB_AGE:-3600}
${VLMFLOW_SLURM_MAX_JOBS:+MaxJobCount=$VLMFLOW_SLURM_MAX_JOBS}
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=1
# Without cgroups, memory limits are enforced by polling: a job over its --mem is
# killed (OUT_OF_MEMORY), so Snakemake retries it with the next attempt's memory.
JobAcctGatherParams=OverMemoryKill
# Backfill every second: without it a GPU job waiting for a GPU holds back CPU jobs
# behind it on the same node for the default 30 s.
SchedulerParameters=batch_sched_delay=0,sched_min_interval=100000,bf_interval=1
DefMemPerCPU=1000
NodeName=localhost CPUs=128 RealMemory=1048576 Gres=gpu:8 State=UNKNOWN
PartitionName=cpu Nodes=localhost Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=localhost MaxTime=INFINITE State=UP
CONF
  cat >/etc/slurm/gres.conf <<CONF
NodeName=localhost Name=gpu File=/dev/fake-gpu[0-7]
CONF
  rm -f /etc/slurm/cgroup.conf
  if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
  fi
  chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge 2>/dev/null || true
  chmod 400 /etc/munge/munge.key
  mkdir -p /run/munge && chown munge:munge /run/munge
}

start() {
  install
  # Daemons of an earlier start that failed or whose run was cut off.
  stop
  configure
  : >"$PIDS"
  runuser -u munge -- munged --force
  pgrep -u munge -x munged >>"$PIDS"
  # -c: begin with no jobs. Jobs saved by a run that was cut off would otherwise be
  # recovered, hold the fake GPUs and keep the node from becoming idle.
  slurmctld -c -i
  sleep 0.5
  cat "$STATE/slurmctld.pid" >>"$PIDS"
  slurmd -N localhost
  sleep 0.5
  cat "$STATE/slurmd.pid" >>"$PIDS"
  for _ in $(seq 1 60); do
    if sinfo -h -N -o '%T' 2>/dev/null | grep -qx idle; then
      echo "slurm: node idle"
      return 0
    fi
    sleep 0.5
  done
  echo "slurm: node did not become idle" >&2
  sinfo -N -l >&2 || true
  tail -n 20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
  return 1
}

stop() {
  stop_daemons
  restore_machine_config
}

stop_daemons() {
  [ -f "$PIDS" ] || return 0
  scancel --user=root 2>/dev/null || true
  tac "$PIDS" | while read -r pid; do
    kill "$pid" 2>/dev/null || true
  done
  # Wait for them to exit, so that a start right after finds the ports free.
  for pid in $(cat "$PIDS"); do
    for _ in $(seq 1 50); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.2
    done
  done
  rm -f "$PIDS"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
