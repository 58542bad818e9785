#!/usr/bin/env bash
# One node of a multi-node run: this node's keeper, then a torchrun agent that joins the others.
#
#   launch/multinode.sh --nnodes 3:4 --nproc-per-node 8 --rdzv-endpoint node0:29500 --rdzv-id demo -- parallel.tp=8
#
# Run it on every node with the same arguments (launch/slurm.sbatch does so under SLURM). The keeper
# is started here rather than by the workers (fault.keeper=external) so that it outlives every
# worker restart torchrun makes, and it carries the node's stable identity (RESURGO_NODE_ID) that
# the other nodes' keepers know it by. Options:
#   --nnodes MIN:MAX         elastic: training goes on while at least MIN nodes are up (or N: exactly N)
#   --nproc-per-node N       workers on this node (usually its number of GPUs)
#   --rdzv-endpoint H:P      c10d: the rendezvous store, hosted by the agent on host H (the same on every node);
#                            etcd: an etcd member's client address (default: this node's member)
#   --rdzv-backend B         c10d (default: the store dies with host H, and the job with it) or etcd
#                            (torchrun's etcd-v2 rendezvous, retried through a lost etcd leader: resurgo-etcd)
#   --etcd-cluster N=H,...   etcd: the members (3 or 5 node ids and hosts); a node named there runs its
#                            member (resurgo.launch.etcd), so the job survives any one node's loss (two with 5);
#                            the other nodes talk to a healthy one
#   --rdzv-id ID             the job's id; also run.name unless an override sets it
#   --max-restarts R         worker group restarts after failures before the job fails (default 3)
#   --rdzv-conf K=V,...      torchrun rendezvous settings (default: $RDZV_CONF below)
#   --run-dir DIR            the run folder, instead of run.root=... run.name=... overrides
#   --node-id ID             this node's identity (default: $RESURGO_NODE_ID, else SLURM's node name, else the hostname)
#   --peer-host ADDR         where other nodes' keepers reach this one (default: $RESURGO_PEER_HOST, else this host's address)
#   --keeper-arg ARG         passed on to the keeper (repeatable), e.g. --keeper-arg --host-memory-gb=64
#   --no-warm-template       start every rank cold (by default a warm template forks them: no imports per restart)
# Everything after -- goes to resurgo.launch.train as Hydra overrides. $PYTHON picks the interpreter.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2; }
die() { echo "multinode.sh: $*" >&2; exit 2; }

# last_call_timeout: once MIN nodes are in, wait 10 s (torch: 30 s) for the rest, which covers the
# start-up skew of nodes launched together and shortens the pause after a node is lost. Heartbeats
# keep torch's defaults (a node is dead after 3 x 5 s): lower ones add store traffic that grows with
# the number of nodes, and a live node declared dead restarts every node.
RDZV_CONF="last_call_timeout=10"
NNODES="" NPROC="" ENDPOINT="" RDZV_ID="" MAX_RESTARTS=3 RUN_DIR="" BACKEND="c10d" ETCD_CLUSTER="" WARM=1
NODE_ID="${RESURGO_NODE_ID:-${SLURMD_NODENAME:-}}" PEER_HOST="${RESURGO_PEER_HOST:-}"
KEEPER_ARGS=()
while [[ $# -gt 0 ]]; do
  [[ "$1" == -- || "$1" == -h || "$1" == --help || "$1" == --no-warm-template || $# -ge 2 ]] || die "$1 needs a value"
  case "$1" in
    --nnodes) NNODES="$2"; shift 2 ;;
    --nproc-per-node) NPROC="$2"; shift 2 ;;
    --rdzv-endpoint) ENDPOINT="$2"; shift 2 ;;
    --rdzv-id) RDZV_ID="$2"; shift 2 ;;
    --rdzv-backend) BACKEND="$2"; shift 2 ;;
    --etcd-cluster) ETCD_CLUSTER="$2"; shift 2 ;;
    --no-warm-template) WARM=""; shift ;;
    --max-restarts) MAX_RESTARTS="$2"; shift 2 ;;
    --rdzv-conf) RDZV_CONF="$2"; shift 2 ;;
    --run-dir) RUN_DIR="$2"; shift 2 ;;
    --node-id) NODE_ID="$2"; shift 2 ;;
    --peer-host) PEER_HOST="$2"; shift 2 ;;
    --keeper-arg) KEEPER_ARGS+=("$2"); shift 2 ;;
    -h|--help) usage ;;
    --) shift; break ;;
    *) die "unknown option $1 (Hydra overrides go after --; --help lists the options)" ;;
  esac
done
OVERRIDES=("$@")
[[ -n "$NNODES" && -n "$NPROC" && -n "$RDZV_ID" ]] ||
  die "--nnodes, --nproc-per-node and --rdzv-id are required (--help lists the options)"
case "$BACKEND" in
  c10d) [[ -n "$ENDPOINT" ]] || die "--rdzv-endpoint is required with the c10d rendezvous" ;;
  etcd | etcd-v2 | resurgo-etcd)
    BACKEND="resurgo-etcd"
    [[ -n "$ENDPOINT" || -n "$ETCD_CLUSTER" ]] || die "etcd needs --etcd-cluster, or --rdzv-endpoint of a running etcd" ;;
  *) die "--rdzv-backend $BACKEND: use c10d or etcd" ;;
esac
PYTHON="${PYTHON:-python}"

# The run folder the workers will use (Hydra: the last override of a key wins), for the keeper.
ROOT="runs" NAME="$RDZV_ID" SET_BY_OVERRIDE=""
for arg in "${OVERRIDES[@]}"; do
  case "${arg#++}" in
    run.root=*|+run.root=*) ROOT="${arg#*=}"; SET_BY_OVERRIDE=1 ;;
    run.name=*|+run.name=*) NAME="${arg#*=}"; SET_BY_OVERRIDE=1 ;;
  esac
done
RUN_ARGS=("run.name=$RDZV_ID")
if [[ -n "$RUN_DIR" ]]; then
  [[ -z "$SET_BY_OVERRIDE" ]] || die "give either --run-dir or run.root=/run.name= overrides, not both"
  RUN_DIR="${RUN_DIR%/}"
  RUN_ARGS=("run.root=$(dirname "$RUN_DIR")" "run.name=$(basename "$RUN_DIR")")
else
  RUN_DIR="$ROOT/$NAME"
fi

# A stable identity, and an address other nodes can reach: `hostname -i` gives 127.0.1.1 on many
# distributions, which no other node can connect to, so a loopback answer falls back to `hostname -I`.
export RESURGO_NODE_ID="${NODE_ID:-$(hostname)}"
if [[ -z "$PEER_HOST" ]]; then
  PEER_HOST="$(hostname -i 2>/dev/null | awk '{print $1}')" || true
  if [[ -z "$PEER_HOST" || "$PEER_HOST" == 127.* || "$PEER_HOST" == ::1 ]]; then
    PEER_HOST="$(hostname -I 2>/dev/null | awk '{print $1}')" || true
  fi
  PEER_HOST="${PEER_HOST:-$(hostname)}"
fi
export RESURGO_PEER_HOST="$PEER_HOST"
# torch 2.13's agents share one store with the workers, but the rank-0 agent publishes its address only
# in the first round it is rank 0: a node joining later (a replacement) waits for it until the
# rendezvous times out. Without the sharing, rank 0 publishes a fresh address every round.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE="${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}"
# Every node runs --nproc-per-node ranks, so each agent computes its ranks from its place in the round;
# otherwise rank 0's agent hands them out through the store, and an agent whose rank 0 was lost right
# then waits for them for 300 s, then dies. Set it to 0 for nodes with different numbers of ranks.
export TORCH_ELASTIC_WORKER_IDENTICAL="${TORCH_ELASTIC_WORKER_IDENTICAL:-1}"

mkdir -p "$RUN_DIR/logs"
KEEPER_LOG="$RUN_DIR/logs/keeper-$RESURGO_NODE_ID.log"
"$PYTHON" -m resurgo.launch.keeper --run-dir "$RUN_DIR" "${KEEPER_ARGS[@]}" >>"$KEEPER_LOG" 2>&1 &
KEEPER_PID=$!
echo "multinode.sh: node $RESURGO_NODE_ID ($RESURGO_PEER_HOST): keeper pid $KEEPER_PID for $RUN_DIR, log $KEEPER_LOG" >&2
PRIVATE="${RESURGO_KEEPER_DIR:-/tmp/resurgo-$(id -u)}"
mkdir -p -m 700 "$PRIVATE"

# This node's etcd member, when the cluster names it; the agent then talks to it.
if [[ -n "$ETCD_CLUSTER" ]]; then
  MEMBER="$("$PYTHON" -m resurgo.launch.etcd --cluster "$ETCD_CLUSTER" --endpoint-of "$RESURGO_NODE_ID")" ||
    die "--etcd-cluster $ETCD_CLUSTER: see the message above"
  if [[ -n "$MEMBER" ]]; then
    "$PYTHON" -m resurgo.launch.etcd --name "$RESURGO_NODE_ID" --cluster "$ETCD_CLUSTER" \
      --data-dir "$PRIVATE/etcd-$RDZV_ID-$RESURGO_NODE_ID" --token "$RDZV_ID" >>"$RUN_DIR/logs/etcd-$RESURGO_NODE_ID.log" 2>&1 &
    HELPER_PIDS="${HELPER_PIDS:-} $!"
    ENDPOINT="${ENDPOINT:-$MEMBER}"
  fi
  # A node that runs no member (or a replacement for one): any healthy member, the client learns the rest from it.
  [[ -n "$ENDPOINT" ]] || ENDPOINT="$("$PYTHON" -m resurgo.launch.etcd --cluster "$ETCD_CLUSTER" --first-healthy)" ||
    die "no member of --etcd-cluster $ETCD_CLUSTER is healthy: see the message above"
  "$PYTHON" -m resurgo.launch.etcd --wait "$ENDPOINT" || die "no healthy etcd at $ENDPOINT (log: $RUN_DIR/logs/etcd-*.log)"
fi

# The warm template the ranks are forked from (launch/warm_template.py); it ends with this script.
if [[ -n "$WARM" ]]; then
  export RESURGO_WARM_TEMPLATE="$PRIVATE/template-$RESURGO_NODE_ID-$$.sock"
  "$PYTHON" -m resurgo.launch.warm_template --socket "$RESURGO_WARM_TEMPLATE" --parent $$ \
    >>"$RUN_DIR/logs/template-$RESURGO_NODE_ID.log" 2>&1 &
  HELPER_PIDS="${HELPER_PIDS:-} $!"
fi

AGENT_PID=""
# SIGTERM (scancel, a preemption) reaches torchrun, which stops its workers; the keeper is asked to
# stop last, after the workers, so it can finish the persists they queued.
on_signal() { [[ -n "$AGENT_PID" ]] && kill -TERM "$AGENT_PID" 2>/dev/null || true; }
stop_keeper() {
  [[ -z "${HELPER_PIDS:-}" ]] || kill -TERM $HELPER_PIDS 2>/dev/null || true
  kill -TERM "$KEEPER_PID" 2>/dev/null && wait "$KEEPER_PID" 2>/dev/null || true
}
trap on_signal TERM INT
trap stop_keeper EXIT

# --local-addr: the rank-0 agent tells every worker to reach the workers' store at this address;
# torch's default, the fully qualified hostname, does not resolve on every cluster.
"$PYTHON" -m torch.distributed.run \
  --nnodes "$NNODES" --nproc-per-node "$NPROC" --max-restarts "$MAX_RESTARTS" \
  --rdzv-backend "$BACKEND" --rdzv-endpoint "$ENDPOINT" --rdzv-id "$RDZV_ID" --rdzv-conf "$RDZV_CONF" \
  --local-addr "$RESURGO_PEER_HOST" \
  -m resurgo.launch.train "${RUN_ARGS[@]}" fault.keeper=external "${OVERRIDES[@]}" &
AGENT_PID=$!
STATUS=""
while [[ -z "$STATUS" ]]; do
  wait "$AGENT_PID" && STATUS=0 || STATUS=$?
  # A trapped signal ends `wait` early (status > 128) while torchrun still stops its workers.
  if (( STATUS > 128 )) && kill -0 "$AGENT_PID" 2>/dev/null; then STATUS=""; fi
done
exit "$STATUS"
