#!/usr/bin/env bash
# Two "hosts" as network namespaces joined by one control link and four
# rate-limited data links, for multi-NIC tests on one machine (issue 5).
#
#   scripts/netns_topology.sh up    [ID]   build it (fails if it exists; cleans up after itself on error)
#   scripts/netns_topology.sh rates [ID]   re-apply the link rates of the variables below
#   scripts/netns_topology.sh down  [ID]   kill what runs inside and delete both namespaces (idempotent)
#   scripts/netns_topology.sh show  [ID]   addresses and qdiscs of both hosts
#
# Needs root, iproute2 (ip, tc), veth and sch_tbf.  Everything lives inside the two
# namespaces it creates: no interface, address, route or qdisc outside them.
#
#   host A = netns $TCPX_NETNS_A (default tcpxA-<ID>), host B = $TCPX_NETNS_B (default tcpxB-<ID>)
#   ID: the argument, else $TCPX_NETNS_ID, else "0"; two runs with different IDs never clash
#
#   eth0 (control, not rate-limited)   A 10.77.0.1/24  <-veth->  B 10.77.0.2/24
#   ethK, K = 1..$TCPX_NETNS_NLINKS     A 10.77.K.1/24  <-veth->  B 10.77.K.2/24
#   lo up in both.
#
# Each data link is limited on the egress of both ends by a tbf qdisc:
#   TCPX_NETNS_RATE_MBIT     rate of every data link in Mbit/s (default 200)
#   TCPX_NETNS_RATE_MBIT_<K> rate of link K alone (e.g. TCPX_NETNS_RATE_MBIT_4=50: a quarter)
#   TCPX_NETNS_NLINKS        number of data links (default 4, at most 8)
set -euo pipefail

CMD=${1:-}
ID=${2:-${TCPX_NETNS_ID:-0}}
NS_A=${TCPX_NETNS_A:-tcpxA-$ID}
NS_B=${TCPX_NETNS_B:-tcpxB-$ID}
NLINKS=${TCPX_NETNS_NLINKS:-4}
RATE=${TCPX_NETNS_RATE_MBIT:-200}

die() { echo "netns_topology: $*" >&2; exit 1; }

usage() {
  sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }

check_args() {
  [[ $ID =~ ^[A-Za-z0-9_.-]+$ ]] || die "bad ID '$ID' (letters, digits, '_', '.', '-')"
  is_uint "$NLINKS" && (( NLINKS >= 1 && NLINKS <= 8 )) || die "TCPX_NETNS_NLINKS=$NLINKS: 1-8"
  [[ $NS_A != "$NS_B" ]] || die "both namespaces are named '$NS_A'"
}

ns_exists() { ip netns list | awk '{print $1}' | grep -qxF -- "$1"; }

link_rate() {  # rate of data link $1 in Mbit/s
  local var="TCPX_NETNS_RATE_MBIT_$1" r
  r=${!var:-$RATE}
  is_uint "$r" && (( r >= 1 )) || die "$var / TCPX_NETNS_RATE_MBIT = '$r': a positive integer (Mbit/s)"
  echo "$r"
}

apply_rates() {
  local k r burst
  for (( k = 1; k <= NLINKS; k++ )); do
    r=$(link_rate "$k")
    # Burst: 2 ms worth of bytes, at least 32 KiB (tbf must pass a full 64 KiB GSO
    # packet by segmenting it; a tiny burst costs throughput at these rates).
    burst=$(( r * 1000000 / 8 / 500 ))
    (( burst < 32768 )) && burst=32768
    for ns in "$NS_A" "$NS_B"; do
      tc -n "$ns" qdisc replace dev "eth$k" root tbf rate "${r}mbit" burst "$burst" latency 50ms
    done
  done
}

down() {
  local ns pids
  for ns in "$NS_A" "$NS_B"; do
    ns_exists "$ns" || continue
    # Processes left inside (e.g. a test job that was interrupted) keep the namespace's
    # network alive after "ip netns del": end them first, by pid.
    pids=$(ip netns pids "$ns" 2>/dev/null || true)
    if [[ -n $pids ]]; then
      kill -TERM $pids 2>/dev/null || true
      for _ in 1 2 3 4 5 6 7 8 9 10; do
        pids=$(ip netns pids "$ns" 2>/dev/null || true)
        [[ -z $pids ]] && break
        sleep 0.2  # polling for exit, not synchronisation between parties
      done
      [[ -n $pids ]] && kill -KILL $pids 2>/dev/null || true
    fi
    ip netns del "$ns" 2>/dev/null || true
  done
}

up() {
  ns_exists "$NS_A" && die "namespace $NS_A exists already (run: $0 down $ID)"
  ns_exists "$NS_B" && die "namespace $NS_B exists already (run: $0 down $ID)"
  for (( k = 1; k <= NLINKS; k++ )); do link_rate "$k" >/dev/null; done
  # From here on any failure (or a signal) removes whatever was built.
  UP_DONE=0
  trap 'rc=$?; if [[ $UP_DONE != 1 ]]; then echo "netns_topology: up failed (status $rc); cleaning up" >&2; down; fi' EXIT
  trap 'exit 130' INT TERM HUP
  ip netns add "$NS_A"
  ip netns add "$NS_B"
  local k ns
  for ns in "$NS_A" "$NS_B"; do ip -n "$ns" link set lo up; done
  # The veth ends are created directly inside the namespaces (never in ours).
  for (( k = 0; k <= NLINKS; k++ )); do
    ip link add "eth$k" netns "$NS_A" type veth peer name "eth$k" netns "$NS_B"
    ip -n "$NS_A" addr add "10.77.$k.1/24" dev "eth$k"
    ip -n "$NS_B" addr add "10.77.$k.2/24" dev "eth$k"
    ip -n "$NS_A" link set "eth$k" up
    ip -n "$NS_B" link set "eth$k" up
  done
  apply_rates
  UP_DONE=1
  echo "netns_topology: up: A=$NS_A B=$NS_B links=$NLINKS rates(Mbit/s)=$(for (( k = 1; k <= NLINKS; k++ )); do printf '%s ' "$(link_rate "$k")"; done)"
}

show() {
  for ns in "$NS_A" "$NS_B"; do
    echo "== $ns"
    ip -n "$ns" -br addr
    tc -n "$ns" qdisc show | grep -v 'noqueue' || true
  done
}

[[ -n $CMD ]] || usage
check_args
case "$CMD" in
  up) [[ $(id -u) == 0 ]] || die "must run as root"; up ;;
  rates) apply_rates; echo "netns_topology: rates applied to $NS_A/$NS_B" ;;
  down) down ;;
  show) show ;;
  *) usage ;;
esac
