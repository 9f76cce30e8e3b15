#!/usr/bin/env bash
# Stop what .ci/slurm_up.sh started, by recorded PID, in reverse order. WIPE=1 also deletes $BASE.
BASE=${BASE:-/tmp/rlhf-exp-slurm}
export SLURM_CONF="$BASE/etc/slurm.conf"
[[ -s "$BASE/run/slurmctld.pid" ]] && timeout 10 scancel --user="$(id -un)" 2>/dev/null
for name in slurmd slurmctld slurmdbd mariadbd munged; do
  f="$BASE/run/$name.pid"; [[ -s "$f" ]] || continue
  pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
  fi
  rm -f "$f"
done
[[ "${WIPE:-0}" == 1 ]] && rm -rf "$BASE"
exit 0
