#!/usr/bin/env bash
# A single-node Slurm cluster on this machine, for the shard test (tests/slurm.rs) and for
# trying the sbatch recipe of docs/cluster.md. Needs root and apt (Debian's slurm-wlm, munge).
#
#   bash scripts/slurm/cluster.sh install   # apt-get install slurm-wlm munge (once)
#   bash scripts/slurm/cluster.sh start     # write slurm.conf, start munged, slurmctld, slurmd
#   bash scripts/slurm/cluster.sh stop      # stop the daemons this script started
#
# No systemd is assumed (containers, CI): the daemons are started directly and their pids kept
# in /run/jumplens-slurm/. Process tracking is proctrack/linuxproc and task/none, which need no
# cgroups (unavailable in most containers).
set -euo pipefail
state=/run/jumplens-slurm
conf_dir=/etc/slurm
cmd=${1:-}

install() {
    if command -v slurmctld >/dev/null && command -v munged >/dev/null; then
        echo "slurm and munge are installed"
        return
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
    echo "installed slurm-wlm and munge"
}

start() {
    command -v slurmctld >/dev/null || { echo "slurmctld not installed: run '$0 install'" >&2; exit 1; }
    mkdir -p "$state" /var/spool/slurmctld /var/spool/slurmd /var/log/slurm "$conf_dir" /run/munge /var/log/munge /var/lib/munge /etc/munge
    host=$(hostname -s)
    cpus=$(nproc)
    mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 2 ))
    cat > "$conf_dir/slurm.conf" <<CONF
ClusterName=jumplens
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
NodeName=$host CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
    # slurmd initialises a cgroup plugin even with the plugins above, but constrains nothing.
    # (Slurm 22.05 has no "disabled" cgroup plugin: use v1 where it is mounted, else v2.)
    if [ -d /sys/fs/cgroup/freezer ]; then cg=cgroup/v1; else cg=cgroup/v2; fi
    printf "CgroupPlugin=%s\nIgnoreSystemd=yes\nConstrainCores=no\nConstrainRAMSpace=no\n" "$cg" > "$conf_dir/cgroup.conf"
    if [ ! -s /etc/munge/munge.key ]; then
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
    chmod 0400 /etc/munge/munge.key
    chmod 0755 /run/munge
    if ! pgrep -x munged >/dev/null; then
        if id munge >/dev/null 2>&1; then
            su -s /bin/sh munge -c "munged --pid-file=$state/munged.pid" 2>/dev/null || munged --force
        else
            munged --force
        fi
        sleep 0.5
    fi
    slurmctld -i
    slurmd
    # Wait until the node is idle (at most 30 s).
    for _ in $(seq 60); do
        if sinfo -h -o '%T' 2>/dev/null | grep -q idle; then
            echo "slurm is up: $(sinfo -h -o '%P %D %T %c')"
            return
        fi
        scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true
        sleep 0.5
    done
    echo "slurm did not come up; logs:" >&2
    tail -n 20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
    exit 1
}

stop() {
    for d in slurmd slurmctld; do
        if [ -s "$state/$d.pid" ]; then
            kill "$(cat "$state/$d.pid")" 2>/dev/null || true
        fi
    done
    if [ -s "$state/munged.pid" ]; then
        kill "$(cat "$state/munged.pid")" 2>/dev/null || true
    fi
    sleep 0.5
    echo "slurm stopped"
}

case "$cmd" in
    install) install ;;
    start) start ;;
    stop) stop ;;
    *) echo "usage: $0 install|start|stop" >&2; exit 2 ;;
esac
