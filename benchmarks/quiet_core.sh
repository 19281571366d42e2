#!/usr/bin/env bash
# benchmarks/quiet_core.sh CMD ARGS...: run a measurement on a quiet core. Every other process of the machine, and
# whatever those start meanwhile, is confined to the other cores by a cpuset cgroup while CMD runs on core 0
# (QUIET_CPUS=...: other cores; OTHERS_CPUS=...: where the rest goes, default the cores not in QUIET_CPUS), then
# given every core back. benchmarks/serve_live.py runs with QUIET_CPUS=0,1 OTHERS_CPUS=1: its servers on core 0
# alone, its load generator on core 1 beside the rest of the machine. For timing on a shared 2-core machine (the serving
# calibration and live validation, docs/serving.md). Needs root and cgroup v1's cpuset (/sys/fs/cgroup/cpuset).
set -u
CG=/sys/fs/cgroup/cpuset
QUIET=${QUIET_CPUS:-0}
if [ ! -w "$CG/cgroup.procs" ]; then
    echo "quiet_core.sh: no writable cgroup v1 cpuset at $CG (needs root); run the command without it" >&2
    exit 2
fi
REST=${OTHERS_CPUS:-}
[ -n "$REST" ] || REST=$(python3 -c "import os; q={int(c) for c in '$QUIET'.split(',')}; print(','.join(map(str, sorted(os.sched_getaffinity(0) - q))))")
mkdir -p "$CG/others"
cat "$CG/cpuset.mems" > "$CG/others/cpuset.mems"
echo "$REST" > "$CG/others/cpuset.cpus"
# every core back, however this ends: a stopped measurement (Ctrl-C, kill) must not leave the machine on one core
child=
restore() {
    if [ -n "$child" ]; then  # stopped, and waited for: this script ends only once its command is gone
        kill "$child" 2>/dev/null
        wait "$child" 2>/dev/null
    fi
    # every core to the confined group first, so that nothing stays on one core, not even a process forked while
    # the group is emptied; then empty it, pass by pass
    cat "$CG/cpuset.cpus" > "$CG/others/cpuset.cpus" 2>/dev/null
    for _ in 1 2 3 4 5 6 7 8 9 10; do
        left=$(cat "$CG/others/cgroup.procs")
        [ -z "$left" ] && break
        for p in $left; do echo "$p" > "$CG/cgroup.procs" 2>/dev/null; done
    done
}
trap restore EXIT
# until the command's pid is known a signal is only noted: acted on between the fork and `child=$!`, it would end
# this script with the command still running
stop=
trap 'stop=130' INT
trap 'stop=143' TERM HUP
for p in $(cat "$CG/cgroup.procs"); do
    [ -n "$stop" ] && exit "$stop"
    echo "$p" > "$CG/others/cgroup.procs" 2>/dev/null
done
[ -n "$stop" ] && exit "$stop"
bash -c 'echo $$ > '"$CG"'/cgroup.procs; exec taskset -c '"$QUIET"' "$@"' quiet "$@" &
child=$!
trap 'exit 130' INT
trap 'exit 143' TERM HUP
[ -n "$stop" ] && exit "$stop"
wait "$child"
rc=$?
child=
exit $rc
