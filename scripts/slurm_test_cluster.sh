#!/usr/bin/env bash
# Start a throwaway one-node SLURM cluster on this machine and print the path of its slurm.conf (export it as
# SLURM_CONF): Debian's slurmctld + slurmd, accounting through slurmdbd on a private MariaDB (so sacct works, which
# submitit needs to see a job die), MUNGE authentication with a private key and socket. Everything lives under DIR;
# nothing of the machine's own configuration is read or changed. Needs root (the daemons run as root here).
# Used by .ci/run and by tests/test_launcher.py when GRADSWEEP_SLURM_CONF is not set.
#   usage: scripts/slurm_test_cluster.sh DIR BASE_PORT     (uses BASE_PORT .. BASE_PORT+3)
#   stop:  scripts/slurm_test_cluster.sh --stop DIR
#   packages: slurmctld slurmd slurm-client slurmdbd munge mariadb-server
set -euo pipefail

stop() {
  local dir=$1
  if [ -f "$dir/slurm.conf" ]; then  # let the cluster's jobs end first, then its daemons
    export SLURM_CONF="$dir/slurm.conf"
    scancel --full --user="$(id -un)" >/dev/null 2>&1 || true
    for _ in $(seq 50); do [ -z "$(squeue -h 2>/dev/null)" ] && break; sleep 0.2; done
    scontrol shutdown >/dev/null 2>&1 || true
  fi
  for p in slurmd slurmctld slurmdbd mariadb munged; do
    [ -f "$dir/$p.pid" ] && kill "$(cat "$dir/$p.pid")" 2>/dev/null || true
  done
  sleep 1
  for p in slurmd slurmctld slurmdbd mariadb munged; do
    [ -f "$dir/$p.pid" ] && kill -9 "$(cat "$dir/$p.pid")" 2>/dev/null || true
  done
  for cwd in /proc/[0-9]*/cwd; do  # a job step left without its slurmd runs in this cluster's directory
    case "$(readlink "$cwd" 2>/dev/null)" in "$dir"/*) kill -9 "$(basename "$(dirname "$cwd")")" 2>/dev/null || true ;; esac
  done
  return 0
}

if [ "${1:-}" = "--stop" ]; then
  stop "$(realpath -m "$2")"
  exit 0
fi
dir=$(realpath -m "$1") base=$2
for bin in slurmctld slurmd slurmdbd sbatch sacct munged mariadbd mariadb-install-db; do
  command -v "$bin" >/dev/null 2>&1 || [ -x "/usr/sbin/$bin" ] || {
    echo "slurm_test_cluster: no $bin (apt-get install slurmctld slurmd slurm-client slurmdbd munge mariadb-server)" >&2
    exit 3
  }
done
[ "$(id -u)" = 0 ] || { echo "slurm_test_cluster: needs root (its daemons run as root)" >&2; exit 3; }
export PATH=$PATH:/usr/sbin
mkdir -p "$dir"/{state,spool,log,db}
chmod 700 "$dir"
trap 'echo "slurm_test_cluster: failed; logs in $dir/log" >&2; stop "$dir"' ERR

# MUNGE: a private key and socket.
mungekey -c -k "$dir/munge.key" 2>/dev/null || dd if=/dev/urandom of="$dir/munge.key" bs=1024 count=1 status=none
chmod 600 "$dir/munge.key"
munged -f -S "$dir/munge.sock" --key-file="$dir/munge.key" --log-file="$dir/log/munged.log" \
  --pid-file="$dir/munged.pid" --seed-file="$dir/munged.seed" 2>/dev/null

# MariaDB for slurmdbd, on loopback.
mariadb-install-db --user=root --datadir="$dir/db" --auth-root-authentication-method=normal >"$dir/log/mariadb-init.log" 2>&1
mariadbd --user=root --datadir="$dir/db" --socket="$dir/mysql.sock" --bind-address=127.0.0.1 --port=$((base + 3)) \
  --pid-file="$dir/mariadb.pid" --log-error="$dir/log/mariadb.log" >/dev/null 2>&1 &
for _ in $(seq 100); do [ -S "$dir/mysql.sock" ] && break; sleep 0.1; done
mariadb -S "$dir/mysql.sock" -u root -e "CREATE DATABASE slurm_acct_db;
  CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm'; GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"

node=$(hostname -s)
mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
cat > "$dir/slurm.conf" <<EOF
ClusterName=gradsweep-test
SlurmctldHost=$node(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$dir/munge.sock
CredType=cred/munge
SlurmctldPort=$base
SlurmdPort=$((base + 1))
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/pgid
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
JobAcctGatherType=jobacct_gather/linux
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$((base + 2))
AccountingStoragePass=$dir/munge.sock
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/builtin
DefMemPerCPU=$(( mem_mb / $(nproc) ))
NodeName=$node NodeAddr=127.0.0.1 CPUs=$(nproc) RealMemory=$mem_mb State=UNKNOWN
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
cat > "$dir/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$dir/munge.sock
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$((base + 2))
SlurmUser=root
PidFile=$dir/slurmdbd.pid
LogFile=$dir/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$((base + 3))
StorageLoc=slurm_acct_db
StorageUser=slurm
StoragePass=slurm
EOF
chmod 600 "$dir/slurmdbd.conf"
export SLURM_CONF=$dir/slurm.conf   # slurmdbd reads slurmdbd.conf beside it

slurmdbd
for _ in $(seq 100); do sacctmgr -n list cluster >/dev/null 2>&1 && break; sleep 0.2; done
sacctmgr -i add cluster gradsweep-test >/dev/null
slurmctld
slurmd
for _ in $(seq 100); do sinfo -h -o %t 2>/dev/null | grep -q idle && break; sleep 0.2; done
sinfo -h -o %t | grep -q idle
echo "$dir/slurm.conf"
