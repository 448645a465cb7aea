#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for trying the project's sbatch files (launch/slurm.sbatch,
# launch/sweeps/slurm_array.sbatch) before a real cluster, and for the tests (tests/test_slurm.py).
#
#   sudo launch/slurm/local_cluster.sh start      # installs SLURM and munge with apt-get if they are missing
#   export SLURM_CONF=/tmp/afqmc-slurm/slurm.conf # what `start` prints: sbatch, squeue, scontrol ... read it
#   ACCELERATE_USE_CPU=1 sbatch --nodes=1 --gres=none --cpus-per-task=2 --output=outputs/%x-%j.log \
#       launch/slurm.sbatch ARGS
#   launch/slurm/local_cluster.sh status          # exit 0 and "up" when it takes jobs, else 1 and why
#   launch/slurm/local_cluster.sh stop            # cancels the jobs, stops the daemons: nothing is left running
#
# One node, `localhost` (address 127.0.0.1), with this machine's CPUs and memory (`slurmd -C`), in one partition
# `debug`. munged, slurmctld and slurmd run as background daemons started by this script, as root (slurmd must be
# root to start jobs), without systemd. Everything they write (slurm.conf, munge key and socket, state, spool,
# logs, pid files) is in one folder:
#   AFQMC_SLURM_DIR      the folder (default /tmp/afqmc-slurm); `start` makes it afresh
#   AFQMC_SLURMCTLD_PORT slurmctld's port (default 16817), AFQMC_SLURMD_PORT slurmd's (default 16818): not
#                        SLURM's usual 6817/6818, so that it can run beside a real SLURM installation
# No cgroups (kernels and containers often refuse them): processes are tracked through /proc
# (proctrack/linuxproc), no CPU binding (task/none), no accounting (so no sacct: `scontrol show job` while the job
# is known, and the job's log, say how it went). Details and what differs on a real cluster: docs/slurm.md.
#
# Failures are one line naming what is wrong (the daemon's log for the details): exit 2 for a wrong command,
# 1 when the cluster cannot be started (not root, no apt-get, a daemon that refuses to start).
set -euo pipefail

DIR="${AFQMC_SLURM_DIR:-/tmp/afqmc-slurm}"
CTLD_PORT="${AFQMC_SLURMCTLD_PORT:-16817}"
SLURMD_PORT="${AFQMC_SLURMD_PORT:-16818}"
NODE=localhost
CONF="$DIR/slurm.conf"
PACKAGES=(munge slurmctld slurmd slurm-client)
CONF_HEADER="Written by launch/slurm/local_cluster.sh"  # the first line of its slurm.conf: this folder is ours

fail() { echo "local_cluster.sh: $*" >&2; exit 1; }    # the cluster cannot start
refuse() { echo "local_cluster.sh: $*" >&2; exit 2; }  # a wrong command or setting

usage() { refuse "usage: $0 start|stop|status (state in \$AFQMC_SLURM_DIR, default /tmp/afqmc-slurm)"; }

for port in "$CTLD_PORT" "$SLURMD_PORT"; do
    [[ "$port" =~ ^[0-9]+$ ]] || refuse "AFQMC_SLURMCTLD_PORT and AFQMC_SLURMD_PORT must be port numbers, got '$port'"
done

# --- processes --------------------------------------------------------------------------------------------------

# This cluster's daemons: munged, slurmctld, slurmd and each job's slurmstepd (which slurmd starts detached,
# with an empty environment), recognised by their name AND a log file of this folder open (slurmstepd keeps
# slurmd's). Another SLURM on the machine, or a second local cluster in another folder, is never touched.
daemon_pids() {
    local proc name
    for proc in /proc/[0-9]*; do
        { read -r name < "$proc/comm"; } 2>/dev/null || continue  # a process that ended meanwhile
        case "$name" in
            munged|slurmctld|slurmscriptd|slurmd|slurmstepd)
                if ls -l "$proc/fd" 2>/dev/null | grep -qF -- "-> $DIR/log/"; then echo "${proc#/proc/}"; fi ;;
        esac
    done
}

# The processes of this cluster's jobs, by their environment (SLURM_CONF=this slurm.conf and a SLURM_JOB_ID):
# also those that left their job's process tree (a job script that ended before its children, with no cgroup to
# hold them). grep -z reads the NUL-separated entries whole.
job_pids() {
    local environ
    # shellcheck disable=SC2046  # one file per word
    for environ in $(grep -lzxF "SLURM_CONF=$CONF" /proc/[0-9]*/environ 2>/dev/null); do
        if grep -qz '^SLURM_JOB_ID=' "$environ" 2>/dev/null; then
            environ=${environ#/proc/}
            [[ ${environ%/environ} == "$$" ]] || echo "${environ%/environ}"
        fi
    done
}

descendants() {  # each PID and every process below it (the jobs' own processes run below their slurmstepd)
    local pid child
    for pid in "$@"; do
        echo "$pid"
        # shellcheck disable=SC2046  # one pid per word
        descendants $(cat /proc/"$pid"/task/*/children 2>/dev/null)
    done
}

alive() {  # PID runs (a zombie, ended but not yet reaped by init, does not count)
    local stat
    [[ -n "$1" ]] && stat=$(cat "/proc/$1/stat" 2>/dev/null) && [[ "${stat##*) }" != Z* ]]
}

cluster_pids() {  # every process of this cluster that still runs
    local pid
    # shellcheck disable=SC2046  # one pid per word
    for pid in $(descendants $(daemon_pids) $(job_pids) | sort -un); do
        if alive "$pid"; then echo "$pid"; fi
    done
}

pid_of() { cat "$DIR/run/$1.pid" 2>/dev/null || true; }

# --- status -----------------------------------------------------------------------------------------------------

# Prints why the cluster is not up (one line), or nothing when it takes jobs.
why_down() {
    local daemon state
    [[ -f "$CONF" ]] || { echo "not started ($CONF does not exist)"; return; }
    for daemon in munged slurmctld slurmd; do
        alive "$(pid_of "$daemon")" || { echo "$daemon is not running (its log: $DIR/log/$daemon.log)"; return; }
    done
    state=$(SLURM_CONF="$CONF" sinfo --noheader --nodes="$NODE" --format=%t 2>&1 | head -n1) || true
    case "$state" in
        idle*|mix*|alloc*|comp*) ;;
        *) echo "node $NODE is not ready: sinfo says '${state:-nothing}'" ;;
    esac
}

is_up() { [[ -z "$(why_down)" ]]; }

status() {
    local why
    why=$(why_down)
    if [[ -n "$why" ]]; then echo "local_cluster.sh: down: $why" >&2; return 1; fi
    echo "local_cluster.sh: up: node $NODE in $DIR (export SLURM_CONF=$CONF)"
}

# --- stop -------------------------------------------------------------------------------------------------------

stop() {
    local daemon pid left jobs
    # Jobs first: SLURM ends them as it does on a cluster (SIGCONT, SIGTERM, SIGKILL KillWait seconds later), and
    # their processes get SIGTERM from here too, in case slurmd is gone before it passed the cancel on: a training
    # run saves a checkpoint and stops.
    if alive "$(pid_of slurmctld)"; then
        jobs=$(SLURM_CONF="$CONF" squeue --noheader --format=%A 2>/dev/null || true)
        # shellcheck disable=SC2086  # one job id per word
        [[ -z "$jobs" ]] || SLURM_CONF="$CONF" scancel --quiet $jobs >/dev/null 2>&1 || true
    fi
    # shellcheck disable=SC2046  # one pid per word
    kill -TERM $(job_pids) 2>/dev/null || true
    for daemon in slurmd slurmctld munged; do
        pid=$(pid_of "$daemon")
        if alive "$pid"; then kill -TERM "$pid" 2>/dev/null || true; fi
    done
    # Up to 20 s for everything to end, then SIGKILL whatever is left of this cluster.
    SECONDS=0
    while left=$(cluster_pids) && [[ -n "$left" ]] && (( SECONDS < 20 )); do sleep 0.2; done
    if [[ -n "$left" ]]; then
        # shellcheck disable=SC2086  # one pid per word
        kill -KILL $left 2>/dev/null || true
        sleep 0.5
        left=$(cluster_pids)
        [[ -z "$left" ]] || fail "processes of the cluster still running after SIGKILL: $(echo $left)"
    fi
    rm -f "$DIR"/run/*.pid
    echo "local_cluster.sh: stopped (nothing of the cluster in $DIR is running)"
}

# --- start ------------------------------------------------------------------------------------------------------

install_packages() {
    local missing=() tool
    for tool in munged slurmctld slurmd sbatch; do command -v "$tool" >/dev/null || missing+=("$tool"); done
    (( ${#missing[@]} == 0 )) && return
    command -v apt-get >/dev/null ||
        fail "${missing[*]} not installed, and no apt-get to install them: install munge and SLURM's daemons and client"
    echo "local_cluster.sh: installing ${PACKAGES[*]} with apt-get (for ${missing[*]})" >&2
    APT_LOG=$(mktemp --tmpdir local_cluster-apt.XXXXXX.log)  # moved into the cluster's folder once it is made
    # The package lists may be missing or stale on a fresh machine: update them only when the install fails.
    # policy-rc.d or no init system: the packages' own services are not started, which is what is wanted here.
    { DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" ||
      { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
            "${PACKAGES[@]}"; }; } >"$APT_LOG" 2>&1 ||
        fail "apt-get could not install ${PACKAGES[*]} (its output: $APT_LOG)"
}

write_conf() {
    local hardware
    # This machine's CPUs, boards, sockets, cores, threads and memory, as slurmd itself counts them.
    hardware=$(slurmd -C | head -n1 | sed -E 's/^NodeName=[^ ]+ //')
    [[ "$hardware" == *CPUs=* ]] || fail "slurmd -C did not describe this machine (it said: $hardware)"
    cat > "$CONF" <<CONF
# $CONF_HEADER: a one-node cluster on this machine, state under $DIR.
ClusterName=afqmc-local
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
# Jobs run as whoever submits them; the daemons as root (slurmd needs it to start jobs for any user).
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: how long a job step's credential is valid, and so how long a requeued job waits before it runs
# again (cred_expire + 1 s). SLURM's default, 120 s, would make every requeue here a two-minute wait.
AuthInfo=socket=$DIR/munge/munge.socket.2,cred_expire=5
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups: process tracking through /proc, no binding, no accounting (the kernel or container may refuse
# cgroups; a real cluster usually has proctrack/cgroup and task/cgroup,task/affinity).
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
# CPUs are the consumable resource (memory is not tracked): several small jobs share the node.
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
# Look at waiting jobs every second (SLURM's default: every 60 s), so that a requeued job starts as soon as it
# may instead of up to a minute later.
SchedulerParameters=sched_interval=1,bf_interval=1
# SLURM's defaults, spelled out because the sbatch files' comments rely on them: SIGTERM, then SIGKILL
# KillWait seconds later; a requeued job's log is appended to; jobs may be requeued.
KillWait=30
JobRequeue=1
# Finished jobs stay visible in \`scontrol show job\` (exit code, restarts) for this long, in seconds.
MinJobAge=600
ReturnToService=2
NodeName=$NODE NodeAddr=127.0.0.1 NodeHostname=$NODE $hardware State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
CONF
}

# wait_for SECONDS DAEMON COMMAND...: run COMMAND every 0.2 s until it succeeds (0), for at most SECONDS, or until
# DAEMON's log says it gave up (1, at once).
wait_for() {
    local limit=$(( SECONDS + $1 )) log="$DIR/log/$2.log"
    shift 2
    while (( SECONDS < limit )); do
        "$@" >/dev/null 2>&1 && return 0
        grep -q -E "fatal:|Error:" "$log" 2>/dev/null && return 1
        sleep 0.2
    done
    return 1
}

abort() {  # a daemon refused: stop the ones already started, then fail with the line
    ( stop ) >/dev/null 2>&1 || true  # a subshell: its own failure must not replace this line
    fail "$@"
}

last_log_line() {  # the daemon's last fatal error or error, else its last line
    { grep -E "fatal|[Ee]rror" "$1" || cat "$1"; } 2>/dev/null | tail -n 1
}

start() {
    (( EUID == 0 )) || fail "must run as root (slurmd starts jobs as their users; munged and slurmd want root)"
    if is_up; then status; return; fi
    # Leftovers of an earlier start (a daemon that died, a half-started cluster) go: a fresh folder. Only a folder
    # this script made (or an empty one) is emptied.
    if [[ -n "$(ls -A "$DIR" 2>/dev/null)" ]] && ! grep -qF "$CONF_HEADER" "$CONF" 2>/dev/null; then
        refuse "$DIR is not empty and not a local cluster's folder: set AFQMC_SLURM_DIR to a new one"
    fi
    APT_LOG=
    install_packages
    [[ -z "$(cluster_pids)" ]] || stop >/dev/null
    rm -rf "$DIR"
    mkdir -p "$DIR"/{munge,state,spool,run,log}
    if [[ -n "$APT_LOG" ]]; then mv "$APT_LOG" "$DIR/apt.log"; fi
    # munged insists on folders owned by the user it runs as, that others may enter (the socket) but not write.
    chmod 755 "$DIR" "$DIR/munge"
    dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
    chmod 400 "$DIR/munge/munge.key"
    write_conf

    munged --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.socket.2" \
        --pid-file="$DIR/run/munged.pid" --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munged.seed" \
        >>"$DIR/log/munged.log" 2>&1 ||
        abort "munged did not start: $(last_log_line "$DIR/log/munged.log") (log: $DIR/log/munged.log)"
    wait_for 10 munged test -S "$DIR/munge/munge.socket.2" ||
        abort "munged did not open its socket: $(last_log_line "$DIR/log/munged.log")"

    # -i: ignore state from an earlier cluster (there is none: the folder is new). Both daemonize.
    SLURM_CONF="$CONF" slurmctld -i -f "$CONF" >>"$DIR/log/slurmctld.log" 2>&1 ||
        abort "slurmctld did not start: $(last_log_line "$DIR/log/slurmctld.log") (log: $DIR/log/slurmctld.log)"
    wait_for 20 slurmctld timeout 5 env SLURM_CONF="$CONF" scontrol ping ||
        abort "slurmctld does not answer: $(last_log_line "$DIR/log/slurmctld.log") (log: $DIR/log/slurmctld.log)"
    # -N: this node's name in slurm.conf (the machine's own host name may be anything).
    SLURM_CONF="$CONF" slurmd -N "$NODE" -f "$CONF" >>"$DIR/log/slurmd.log" 2>&1 ||
        abort "slurmd did not start: $(last_log_line "$DIR/log/slurmd.log") (log: $DIR/log/slurmd.log)"
    wait_for 30 slurmd is_up || abort "$(why_down) (logs: $DIR/log/slurmctld.log, $DIR/log/slurmd.log)"
    echo "export SLURM_CONF=$CONF" > "$DIR/env"
    status
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) usage ;;
esac
