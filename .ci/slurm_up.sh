#!/usr/bin/env bash
# A real single-node SLURM cluster for the `slurm` tests: munged, MariaDB + slurmdbd (accounting:
# submitit reads job states with sacct; without it a job that dies unreported is waited on forever),
# slurmctld and slurmd. Debian's packages; no systemd needed (each daemon is started here, its PID
# recorded); everything (config, state, logs, sockets) lives under $BASE.
#
#   INSTALL=1 .ci/slurm_up.sh          # apt-get install, then start (about 40 s cold, 3 s warm)
#   export SLURM_CONF=$BASE/etc/slurm.conf
#   .ci/slurm_down.sh                  # stop the daemons (WIPE=1 also deletes $BASE)
#
# Facts this relies on (learned bringing it up on Debian 12 with Slurm 22.05): NodeName must be
# `hostname -s` and addresses 127.0.0.1 (no name lookups); with a non-default munge socket the
# slurmctld<->slurmdbd link takes the socket from AccountingStoragePass; RealMemory a little under
# what `slurmd -C` reports so the node is never drained; ports 6817-6819 and 3306 (one cluster per host).
set -euo pipefail
BASE=${BASE:-/tmp/rlhf-exp-slurm}
CLUSTER=rlhfci
DBPASS=rlhfci

die() { echo "slurm_up: $*" >&2; for f in "$BASE"/log/*.log "$BASE"/db/mariadb.err; do [[ -f $f ]] && { echo "== $f" >&2; tail -n 20 "$f" >&2; }; done; exit 1; }
waitfor() { # waitfor SECONDS COMMAND...: retry until it succeeds
  local end=$(( $(date +%s) + $1 )); shift
  while (( $(date +%s) < end )); do timeout 10 "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done; return 1
}
start() { # start NAME COMMAND...: run a daemon in the foreground mode, in the background, PID recorded
  local name=$1; shift
  setsid "$@" </dev/null >"$BASE/log/$name.stdout" 2>&1 &
  echo $! > "$BASE/run/$name.pid"
}

if [[ "${INSTALL:-0}" == 1 ]]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  # package scripts cannot start daemons without systemd; that is expected, we start them below
  apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge slurmdbd mariadb-server
fi

HOST=$(hostname -s)
DETECTED=$(slurmd -C | head -1)
MEM=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$DETECTED")
NODELINE=$(sed "s/RealMemory=[0-9]*/RealMemory=$(( MEM * 95 / 100 ))/" <<<"$DETECTED")

mkdir -p "$BASE"/{etc,log,run,state/slurmctld,state/slurmd}
install -d -o munge -g munge -m 0755 "$BASE/run/munge"
install -d -o munge -g munge -m 0700 "$BASE/log/munge" "$BASE/state/munge"
if [[ ! -s /etc/munge/munge.key ]]; then
  mkdir -p /etc/munge
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
  chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key
fi
SOCK="$BASE/run/munge/munge.socket.2"

cat > "$BASE/etc/slurm.conf" <<CONF
ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s);
# the preemption test requeues jobs
AuthInfo=socket=$SOCK,cred_expire=20
StateSaveLocation=$BASE/state/slurmctld
SlurmdSpoolDir=$BASE/state/slurmd
SlurmctldPidFile=$BASE/run/slurmctld.daemon.pid
SlurmdPidFile=$BASE/run/slurmd.daemon.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd.log
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=6819
AccountingStoragePass=$SOCK
JobAcctGatherType=jobacct_gather/linux
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
InactiveLimit=0
# KillWait: SIGTERM -> SIGKILL (SLURM's default, 30 s). On scontrol requeue a job must finish its step
# and save in that window (measured: 0.1-0.2 s for the tiny PPO job once each job used only its one CPU)
KillWait=30
MinJobAge=300
Waittime=0
$NODELINE NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
CONF
export SLURM_CONF="$BASE/etc/slurm.conf"

# munged (as the munge user; it refuses a key or folders with loose permissions)
runuser -u munge -- /usr/sbin/munged --socket="$SOCK" --pid-file="$BASE/run/munge/munged.pid" \
  --log-file="$BASE/log/munge/munged.log" --seed-file="$BASE/state/munge/munged.seed"
waitfor 10 test -S "$SOCK" || die "munged did not start"
cp "$BASE/run/munge/munged.pid" "$BASE/run/munged.pid"

# MariaDB (no /etc/mysql defaults, TCP on 127.0.0.1 only) and slurmdbd
DB="$BASE/db"
install -d -o mysql -g mysql -m 0750 "$DB" "$DB/data" "$DB/run"
[[ -d "$DB/data/mysql" ]] || mariadb-install-db --no-defaults --user=mysql --datadir="$DB/data" --skip-test-db \
  --auth-root-authentication-method=socket > "$BASE/log/mariadb-install.log" 2>&1 || die "mariadb-install-db failed"
start mariadbd /usr/sbin/mariadbd --no-defaults --user=mysql --datadir="$DB/data" --socket="$DB/run/mysqld.sock" \
  --pid-file="$DB/run/mysqld.pid" --log-error="$DB/mariadb.err" --port=3306 --bind-address=127.0.0.1 \
  --skip-name-resolve --innodb-buffer-pool-size=128M
waitfor 60 mariadb-admin --no-defaults -S "$DB/run/mysqld.sock" ping || die "mariadbd did not start"
mariadb --no-defaults -S "$DB/run/mysqld.sock" -u root -e "
  CREATE DATABASE IF NOT EXISTS slurm_acct_db;
  CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DBPASS';
  GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;"
cat > "$BASE/etc/slurmdbd.conf" <<CONF
AuthType=auth/munge
AuthInfo=socket=$SOCK
DbdHost=$HOST
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
LogFile=$BASE/log/slurmdbd.log
PidFile=$BASE/run/slurmdbd.daemon.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=3306
StorageUser=slurm
StoragePass=$DBPASS
StorageLoc=slurm_acct_db
CONF
chmod 600 "$BASE/etc/slurmdbd.conf"  # slurmdbd refuses a readable one
start slurmdbd /usr/sbin/slurmdbd -D
waitfor 60 sacctmgr -n list cluster || die "slurmdbd did not come up"
sacctmgr -n list cluster format=cluster | grep -qw "$CLUSTER" || sacctmgr -i add cluster "$CLUSTER" >/dev/null

start slurmctld /usr/sbin/slurmctld -D -f "$SLURM_CONF"
waitfor 60 bash -c 'scontrol ping | grep -q UP' || die "slurmctld did not come up"
start slurmd /usr/sbin/slurmd -D -f "$SLURM_CONF"
waitfor 60 bash -c 'sinfo -h -N -o %T | grep -q "^idle"' || die "the node did not become idle: $(sinfo -h -N -o '%T %E')"
sinfo
echo "export SLURM_CONF=$SLURM_CONF"
