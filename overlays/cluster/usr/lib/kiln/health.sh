# shellcheck shell=sh
# Health checks of a cluster node's roles, shared by k3s-run (k3s waits for the local etcd
# member) and await-roles (the `[kiln] ready` line waits for every role). Each check prints a
# short state on stdout and succeeds only when the role is healthy.
# Every path is under ${KILN_ROOT:-} so the checks can be tested on a host.

# The etcd member on this node answers on its loopback health URL and has a leader: etcd's
# /health is `"health":"true"` only when the member sees a leader, i.e. the group has quorum.
# The client port requires a client certificate; the metrics listener (plain HTTP, 127.0.0.1
# only, /health and /metrics, no keys or values) does not.
etcd_healthy() {
    url=$(sed -n 's/^ETCD_LISTEN_METRICS_URLS=//p' "${KILN_ROOT:-}/etc/kiln/etcd.env" | tr ',' '\n' | grep -m1 '^http://127\.0\.0\.1:')
    if [ -z "$url" ]; then
        echo "no loopback health URL (ETCD_LISTEN_METRICS_URLS) in /etc/kiln/etcd.env"
        return 1
    fi
    answer=$(wget -q -T 5 -O - "$url/health" 2>/dev/null) || answer=""
    case "$answer" in
        *'"health":"true"'*) echo "member healthy, cluster has quorum" ;;
        "") echo "no answer from $url/health"; return 1 ;;
        *) echo "$answer"; return 1 ;;
    esac
}

# The k3s server reports this node Ready.
k3s_server_ready() {
    status=$("${KILN_ROOT:-}/usr/local/bin/k3s" kubectl get node "$KILN_NODE_NAME" \
        -o 'jsonpath={.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null) || status=""
    if [ "$status" = True ]; then
        echo "node $KILN_NODE_NAME Ready"
    else
        echo "node $KILN_NODE_NAME not Ready yet (${status:-no answer from the API server})"
        return 1
    fi
}

# The k3s agent has registered: the kubelet runs only once the agent has its certificates from
# a server, and answers `ok` on its health port then.
k3s_agent_ready() {
    answer=$(wget -q -T 5 -O - http://127.0.0.1:10248/healthz 2>/dev/null) || answer=""
    if [ "$answer" = ok ]; then
        echo "registered, kubelet healthy"
    else
        echo "not registered yet (kubelet health: ${answer:-no answer})"
        return 1
    fi
}
