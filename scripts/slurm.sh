#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, for `sweep=slurm` and the tests marked `slurm` (README, "SLURM").
#   scripts/slurm.sh up      install slurm-wlm and munge if missing (Debian/Ubuntu, as root), write slurm.conf for
#                            localhost under $KILN_SLURM_DIR, start munged, slurmctld and slurmd, wait until the node
#                            is idle (exit 1, with the daemons' logs, when it does not come up)
#   scripts/slurm.sh down    stop exactly the daemons `up` started (the pids it recorded), nothing else
#   scripts/slurm.sh status  sinfo, and which recorded daemons still run
# Idempotent: `up` with the cluster up changes nothing. The clients (sinfo, sbatch, submitit) find the config through
# /etc/slurm/slurm.conf, which `up` links to its own when the machine has none (and `down` removes that link).
set -euo pipefail

DIR=${KILN_SLURM_DIR:-/var/tmp/kiln-slurm}
CONF=$DIR/slurm.conf
PIDS=$DIR/pids            # "name pid" per daemon this script started
ETC_CONF=/etc/slurm/slurm.conf
WAIT_S=${KILN_SLURM_WAIT_S:-60}

say() { echo "slurm.sh: $*"; }
die() { echo "slurm.sh: error: $*" >&2; exit 1; }

recorded_pid() { [[ -f $PIDS ]] && awk -v n="$1" '$1 == n {print $2}' "$PIDS" | tail -1 || true; }
alive() { [[ -n ${1:-} ]] && kill -0 "$1" 2>/dev/null; }

install_packages() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
    return
  fi
  [[ $(id -u) == 0 ]] || die "slurm-wlm and munge are not installed and this is not root: install them (apt-get install slurm-wlm munge) or run as root"
  command -v apt-get >/dev/null || die "slurm-wlm and munge are not installed and there is no apt-get: install SLURM and munge with this system's package manager"
  say "installing slurm-wlm and munge (apt-get)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
}

start_munge() {
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    say "munged already answers; left as it is"
    return
  fi
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
  chmod 0755 /run/munge
  if [[ ! -s /etc/munge/munge.key ]]; then
    say "creating /etc/munge/munge.key"
    if command -v mungekey >/dev/null; then mungekey --create --force; else
      dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none; fi
    chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key
  fi
  # -F: stay in the foreground, so $! is the daemon's own pid.
  setsid nohup setpriv --reuid=munge --regid=munge --init-groups munged -F >"$DIR/munged.out" 2>&1 < /dev/null &
  echo "munged $!" >>"$PIDS"
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
  munge -n | unmunge >/dev/null || die "munged did not start (see $DIR/munged.out)"
  say "started munged (pid $(recorded_pid munged))"
}

write_conf() {
  # The node as slurmd sees it (CPUs, sockets, cores, threads), so slurmd does not drain it for a mismatch;
  # RealMemory half of what it sees (never more than the machine has, which would drain it too).
  local hw cpus mem
  hw=$(slurmd -C | head -1)
  cpus=$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<<"$hw")
  mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$hw")
  local topo
  topo=$(grep -o 'Boards=[0-9]* SocketsPerBoard=[0-9]* CoresPerSocket=[0-9]* ThreadsPerCore=[0-9]*' <<<"$hw" || true)
  mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"
  cat >"$CONF.tmp" <<EOF
# Written by scripts/slurm.sh: a single-node cluster on localhost, no GPUs, no cgroups, no accounting.
ClusterName=kiln
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
NodeName=localhost CPUs=$cpus $topo RealMemory=$((mem / 2)) State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
  if [[ -f $CONF ]] && cmp -s "$CONF" "$CONF.tmp"; then rm "$CONF.tmp"; else mv "$CONF.tmp" "$CONF"; say "wrote $CONF (CPUs=$cpus RealMemory=$((mem / 2)) MB)"; fi
  if [[ ! -e $ETC_CONF ]]; then
    mkdir -p "$(dirname "$ETC_CONF")"
    ln -s "$CONF" "$ETC_CONF"
    touch "$DIR/etc-link"
    say "linked $ETC_CONF -> $CONF"
  elif [[ $(readlink -f "$ETC_CONF") != "$(readlink -f "$CONF")" ]]; then
    die "$ETC_CONF exists and is not this script's: this machine has its own SLURM config; use that cluster (or move the file away)"
  fi
}

start_daemon() {  # name: slurmctld | slurmd
  local name=$1 pid
  pid=$(recorded_pid "$name")
  if alive "$pid"; then say "$name already runs (pid $pid)"; return; fi
  # -D: foreground, so $! is the daemon itself; -f: our config.
  setsid nohup "$name" -D -f "$CONF" >"$DIR/log/$name.out" 2>&1 < /dev/null &
  echo "$name $!" >>"$PIDS"
  say "started $name (pid $!)"
}

node_state() { sinfo -h -N -n localhost -o '%T' 2>/dev/null | head -1; }

up() {
  mkdir -p "$DIR"
  install_packages
  write_conf
  start_munge
  start_daemon slurmctld
  sleep 1
  start_daemon slurmd
  local state=""
  for _ in $(seq $((WAIT_S * 2))); do
    state=$(node_state || true)
    case $state in idle|mixed|allocated) break ;; esac
    if [[ $state == down* || $state == drain* ]]; then scontrol update nodename=localhost state=resume 2>/dev/null || true; fi
    sleep 0.5
  done
  case $state in
    idle|mixed|allocated) say "node localhost is $state:"; sinfo ;;
    *) echo "--- slurmctld log" >&2; tail -n 20 "$DIR/log/slurmctld.log" "$DIR/log/slurmctld.out" >&2 || true
       echo "--- slurmd log" >&2; tail -n 20 "$DIR/log/slurmd.log" "$DIR/log/slurmd.out" >&2 || true
       die "the node did not become idle within ${WAIT_S}s (state: ${state:-no answer from slurmctld})" ;;
  esac
}

down() {
  [[ -f $PIDS ]] || { say "nothing recorded in $PIDS: nothing to stop"; return; }
  local name pid
  # Reverse order: slurmd, slurmctld, then munged.
  tac "$PIDS" | while read -r name pid; do
    if alive "$pid"; then
      kill "$pid"
      for _ in $(seq 50); do alive "$pid" || break; sleep 0.1; done
      if alive "$pid"; then kill -9 "$pid"; fi
      say "stopped $name (pid $pid)"
    fi
  done
  rm -f "$PIDS"
  if [[ -f $DIR/etc-link ]]; then rm -f "$ETC_CONF" "$DIR/etc-link"; say "removed the link $ETC_CONF"; fi
}

status() {
  if [[ -f $PIDS ]]; then
    while read -r name pid; do
      if alive "$pid"; then say "$name runs (pid $pid)"; else say "$name (pid $pid) is gone"; fi
    done <"$PIDS"
  else
    say "no daemons recorded in $PIDS"
  fi
  sinfo 2>&1 || true
}

case ${1:-} in
  up) up ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 up|down|status   (config and state in \$KILN_SLURM_DIR, default /var/tmp/kiln-slurm)" >&2; exit 2 ;;
esac
