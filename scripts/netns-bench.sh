#!/usr/bin/env bash
# A kernel-level check of `strata bench --latency`: the same K-node swarm, but every node in
# its own network namespace behind a veth, with `tc netem` adding one-way latency (and `tc tbf`
# an optional rate cap) on each node's link. Strata's own injection (p2p.WithLatency) delays
# frames in user space; this delays packets, ACKs and handshakes too, so the two together say
# whether the pipeline's decode really follows 1 / (compute + links x latency).
#
# It measures the swarm twice through the entry node's API, without and then with netem, and
# prints both tables and the prediction. Needs root, iproute2 and the sch_netem kernel module
# (NETEM=0 skips the delay, to check the rest where netem is missing). It touches only the
# namespaces it creates (strata-nb-*), removes them and its nodes on exit, and every step is
# bounded by TIMEOUT seconds.
#
#   sudo scripts/netns-bench.sh                       # 3 nodes, 70b preset, 4 layers, 20ms
#   sudo NODES=2 LATENCY=5ms RATE=1gbit scripts/netns-bench.sh
set -euo pipefail

NODES=${NODES:-3}
LATENCY=${LATENCY:-20ms}
RATE=${RATE:-}
PRESET=${PRESET:-70b}
LAYERS=${LAYERS:-4}
TYPE=${TYPE:-q4_0}
TOKENS=${TOKENS:-32}
PROMPT_TOKENS=${PROMPT_TOKENS:-64}
NETEM=${NETEM:-1}
TIMEOUT=${TIMEOUT:-600}
STRATA=${STRATA:-$(pwd)/bin/strata}
WORK=${WORK:-$(mktemp -d /tmp/strata-netns.XXXXXX)}
NET=10.78.0

[[ $(id -u) == 0 ]] || { echo "netns-bench: needs root (network namespaces and tc)" >&2; exit 1; }
command -v ip >/dev/null && command -v tc >/dev/null || { echo "netns-bench: needs iproute2 (apt-get install iproute2)" >&2; exit 1; }
[[ -x $STRATA ]] || { echo "netns-bench: no strata binary at $STRATA (make build, or set STRATA)" >&2; exit 1; }

pids=()
cleanup() {
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
	wait 2>/dev/null || true
	for ns in $(ip netns list | awk '/^strata-nb-/{print $1}'); do ip netns del "$ns" 2>/dev/null || true; done
}
trap cleanup EXIT INT TERM
cleanup # namespaces a killed earlier run left behind

# A hub namespace holds the bridge and the benchmark client; node i sits at $NET.i.
ip netns add strata-nb-hub
ip -n strata-nb-hub link set lo up
ip -n strata-nb-hub link add br0 type bridge
ip -n strata-nb-hub addr add "$NET.254/24" dev br0
ip -n strata-nb-hub link set br0 up
for i in $(seq 1 "$NODES"); do
	ns=strata-nb-$i
	ip netns add "$ns"
	ip -n "$ns" link set lo up
	ip link add "sn$i" netns "$ns" type veth peer name "h$i" netns strata-nb-hub
	ip -n "$ns" addr add "$NET.$i/24" dev "sn$i"
	ip -n "$ns" link set "sn$i" up
	ip -n strata-nb-hub link set "h$i" master br0 up
done

# The plan: the model (synthesized once into WORK) and the memory that makes the nodes form
# one NODES-stage chain, exactly as `strata bench` starts its local nodes.
eval "$(timeout "$TIMEOUT" "$STRATA" bench --plan --preset "$PRESET" --layers "$LAYERS" --type "$TYPE" \
	--nodes "$NODES" --concurrency 1 --tokens "$TOKENS" --prompt-tokens "$PROMPT_TOKENS" --data-dir "$WORK")"
echo "netns-bench: model $STRATA_MODEL, $NODES nodes x --max-memory $STRATA_NODE_MEMORY"

join=""
for i in $(seq 1 "$NODES"); do
	dir=$WORK/node$i
	mkdir -p "$dir"
	args=(node start --model "$STRATA_MODEL" --data-dir "$dir" --listen "/ip4/$NET.$i/tcp/4001" --api "$NET.$i:8080"
		--mdns=false --max-memory "$STRATA_NODE_MEMORY" --context "$STRATA_CONTEXT" --max-sessions "$STRATA_SESSIONS"
		--threads "$STRATA_THREADS" --codec "$STRATA_CODEC")
	[[ -n $join ]] && args+=(--join "$join")
	ip netns exec "strata-nb-$i" timeout "$TIMEOUT" "$STRATA" "${args[@]}" >"$dir/log" 2>&1 &
	pids+=($!)
	if [[ -z $join ]]; then
		for _ in $(seq 1 "$TIMEOUT"); do [[ -s $dir/multiaddr ]] && break; sleep 1; done
		join=$(grep "/ip4/$NET.1/tcp/" "$dir/multiaddr" | head -1)
		[[ -n $join ]] || { echo "netns-bench: node 1 wrote no address; its log:" >&2; tail -20 "$dir/log" >&2; exit 1; }
	fi
done

ready() {
	ip netns exec strata-nb-hub timeout 5 "$STRATA" status --api "$NET.1:8080" --json 2>/dev/null | grep -q '"ready":true'
}
for _ in $(seq 1 "$TIMEOUT"); do ready && break; sleep 1; done
ready || { echo "netns-bench: the swarm did not become ready; node logs in $WORK" >&2; exit 1; }

measure() { # name, extra bench args...
	local name=$1
	shift
	ip netns exec strata-nb-hub timeout "$TIMEOUT" "$STRATA" bench --api "$NET.1:8080" --model "$STRATA_MODEL" \
		--concurrency 1 --tokens "$TOKENS" --prompt-tokens "$PROMPT_TOKENS" --json "$WORK/$name.json" "$@"
}
decode() { grep -oE '"decode_tok_s": ?[0-9.eE+-]+' "$1" | head -1 | grep -oE '[0-9.eE+-]+$'; }
links() { grep -oE '"links": ?[0-9]+' "$1" | head -1 | grep -oE '[0-9]+$'; }

echo "## plain veths"
measure plain

if [[ $NETEM == 1 ]]; then
	for i in $(seq 1 "$NODES"); do
		if ! ip netns exec "strata-nb-$i" tc qdisc add dev "sn$i" root handle 1: netem delay "$LATENCY"; then
			echo "netns-bench: tc netem failed: this kernel lacks sch_netem (NETEM=0 runs the rest without it)" >&2
			exit 1
		fi
		if [[ -n $RATE ]]; then
			ip netns exec "strata-nb-$i" tc qdisc add dev "sn$i" parent 1: handle 2: tbf rate "$RATE" burst 256kb latency 1s
		fi
	done
	echo "## netem: $LATENCY one-way${RATE:+, $RATE} on every node's link"
	measure netem --latency "$LATENCY"
	d0=$(decode "$WORK/plain.json") d1=$(decode "$WORK/netem.json") n=$(links "$WORK/netem.json")
	lat=$(awk -v l="$LATENCY" 'BEGIN{ if (l ~ /ms$/) { sub(/ms$/, "", l); print l/1000 } else if (l ~ /us$/) { sub(/us$/, "", l); print l/1e6 } else { sub(/s$/, "", l); print l } }')
	# The API's own answers cross one delayed link too, but only once per token stream, not per step.
	awk -v d0="$d0" -v d1="$d1" -v n="$n" -v l="$lat" 'BEGIN{
		p = 1 / (1/d0 + n*l)
		printf "decode %.3f tok/s plain, %.3f with netem; predicted 1/(1/%.3f + %d x %gs) = %.3f; measured/predicted %.2f\n", d0, d1, d0, n, l, p, d1/p }'
fi
echo "netns-bench: logs and JSON in $WORK"
