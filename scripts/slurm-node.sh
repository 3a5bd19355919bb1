#!/usr/bin/env bash
# A one-node Slurm cluster for the tests and bench/bench_slurm.py: munged, slurmctld and slurmd
# as root, every file (config, key, sockets, state, logs) under DIR.
#
#   scripts/slurm-node.sh start DIR   # prints `export SLURM_CONF=DIR/slurm.conf` once sinfo says idle
#   scripts/slurm-node.sh stop DIR    # ends the daemons it started (by their pid files)
#   scripts/slurm-node.sh stop-controller DIR / start-controller DIR   # slurmctld only
#
# Needs root and: apt-get install slurm-wlm munge (Debian 12: Slurm 22.05). Ports: $SLURM_PORT
# (slurmctld) and $SLURM_PORT+1 (slurmd), 6817 unless set.
#
# Made for a container without cgroup delegation: processes are tracked through /proc
# (proctrack/linuxproc), no task confinement (task/none), no usage sampling
# (jobacct_gather/none), no accounting database (accounting_storage/none: finished jobs are
# known to slurmctld for MinJobAge seconds, and the job's own exit record after that).
set -euo pipefail
action=${1:?usage: slurm-node.sh start|stop|stop-controller|start-controller DIR}
DIR=$(realpath -m "${2:?usage: slurm-node.sh $action DIR}")
PORT=${SLURM_PORT:-6817}
CONF=$DIR/slurm.conf
export SLURM_CONF=$CONF

say() { echo "slurm-node: $*" >&2; }

stop_pid() {  # the daemon whose pid file this is, SIGTERM then wait (it removes nothing else)
    local pidfile=$1 pid
    [ -f "$pidfile" ] || return 0
    pid=$(cat "$pidfile")
    if kill "$pid" 2>/dev/null; then
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
    fi
    rm -f "$pidfile"
}

start_controller() {
    /usr/sbin/slurmctld -f "$CONF"
    for _ in $(seq 100); do
        scontrol ping 2>/dev/null | grep -q "is UP" && return 0
        sleep 0.1
    done
    say "slurmctld did not come up; see $DIR/slurmctld.log"
    tail -5 "$DIR/slurmctld.log" >&2
    return 1
}

case $action in
start)
    [ "$(id -u)" = 0 ] || { say "needs root"; exit 2; }
    for tool in munged mungekey slurmctld slurmd sinfo sbatch; do
        command -v "$tool" >/dev/null || PATH=$PATH:/usr/sbin command -v "$tool" >/dev/null \
            || { say "$tool missing: apt-get install slurm-wlm munge"; exit 2; }
    done
    host=$(hostname -s)
    mkdir -p "$DIR"/{ctld,spool,munge}
    chmod 0755 "$DIR/munge"
    [ -f "$DIR/munge/munge.key" ] || mungekey --create --keyfile="$DIR/munge/munge.key"
    cpus=$(nproc)
    mem=$(awk '/MemTotal/ { print int($2 / 1024 / 2) }' /proc/meminfo)
    cat >"$CONF" <<EOF
ClusterName=prngtest
SlurmctldHost=$host
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$DIR/munge/munge.socket
CredType=cred/munge
StateSaveLocation=$DIR/ctld
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
MpiDefault=none
ReturnToService=2
KillWait=5
InactiveLimit=0
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
    printf 'CgroupPlugin=autodetect\n' >"$DIR/cgroup.conf"
    /usr/sbin/munged --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.socket" \
        --pid-file="$DIR/munged.pid" --log-file="$DIR/munged.log" \
        --seed-file="$DIR/munge/munged.seed" --force
    start_controller
    /usr/sbin/slurmd -f "$CONF"
    for _ in $(seq 200); do
        [ "$(sinfo -h -n "$host" -o %t 2>/dev/null)" = idle ] && { echo "export SLURM_CONF=$CONF"; exit 0; }
        sleep 0.1
    done
    say "node $host not idle after 20 s: $(sinfo -h -N -o '%N %t %E' 2>&1); see $DIR/slurmd.log"
    exit 1
    ;;
stop)
    # Jobs outlive slurmd (their slurmstepd runs on): cancelled first, while slurmctld is up.
    if [ -f "$DIR/slurmctld.pid" ] && scancel --quiet --user="$(id -un)" 2>/dev/null; then
        for _ in $(seq 100); do
            [ -z "$(squeue -h -t running,completing -o %i 2>/dev/null)" ] && break
            sleep 0.1
        done
    fi
    for daemon in slurmd slurmctld munged; do stop_pid "$DIR/$daemon.pid"; done
    ;;
stop-controller)
    stop_pid "$DIR/slurmctld.pid"
    ;;
start-controller)
    start_controller
    ;;
*)
    say "unknown action $action"
    exit 2
    ;;
esac
