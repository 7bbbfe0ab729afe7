# The testbed's real node, sourced by `testbed`: a kubelet with containerd, runc and the
# CNI bridge plugin that runs real processes in real pods, next to kwok's simulated nodes.
# The chart's pods (controller, node agents, gateway) and the ComfyUI double run here as
# they do on EKS: under their own ServiceAccount tokens, with Node authorization and
# NodeRestriction on, hostPaths and securityContexts enforced by a real runtime.
#
# Network, all on this machine:
#   - pods live on the bridge $NODE_BRIDGE ($NODE_BRIDGE_IP/24); the host reaches pod IPs
#     directly (probes, logs, exec, the tests);
#   - kube-proxy (iptables mode, every Service masqueraded) gives pods and the host the
#     cluster's Service IPs; the `kubernetes` Service points at hostproxy, which forwards
#     the bridge address to the apiserver on 127.0.0.1 (moto's port too: pods reach S3 at
#     http://$NODE_BRIDGE_IP:$MOTO_PORT);
#   - forwarding is on for the bridge alone, and a FORWARD rule drops anything from the
#     bridge to another interface: nothing is routed off the host.
#
# The node is tainted `sdfleet.io/testbed-real-node:NoSchedule` (and `nvidia.com/gpu`, as
# a GPU node), so simulated fleets keep to kwok nodes; a test that wants it takes the
# node's lock (tests/support) and removes the first taint. fakegpu advertises
# nvidia.com/gpu through the kubelet's device-plugin API.
#
# Teardown (node_down) goes in the order the runtime needs: pods, kubelet, the Node,
# leftover containers, containerd and its shims, kube-proxy's rules, mounts, network
# namespaces, the bridge, cgroups. `testbed check-clean` fails if anything is left.

NODE_NAME=${SDFLEET_TESTBED_NODE_NAME:-testbed-gpu-0}
NODE_BRIDGE=sdfleet0
NODE_BRIDGE_IP=10.88.0.1
NODE_POD_CIDR=10.88.0.0/24
NODE_INSTANCE_TYPE=g5.2xlarge
# The Debian packages the node needs (containerd 1.6: Kubernetes 1.35 is the last release
# that supports containerd 1.x; check before moving the testbed past 1.35).
NODE_PACKAGES=(containerd runc containernetworking-plugins umoci iptables conntrack)
NODE_TAINT=sdfleet.io/testbed-real-node
# Files outside the testbed's state that the node creates; removed by node_down when
# they did not exist before `up`.
NODE_HOST_DIRS=(/var/lib/kubelet /run/containerd /var/lib/cni /mnt/k8s-disks)

node_enabled() { [ "${SDFLEET_TESTBED_REAL_NODE:-1}" != 0 ]; }

node_packages() {
  local missing=0
  for c in containerd runc umoci iptables iptables-restore conntrack; do command -v "$c" >/dev/null || missing=1; done
  [ -x /usr/lib/cni/bridge ] && [ -x /usr/lib/cni/host-local ] || missing=1
  [ $missing = 0 ] && return 0
  [ "$(id -u)" = 0 ] || die "the real node needs ${NODE_PACKAGES[*]} (Debian packages) and root; or set SDFLEET_TESTBED_REAL_NODE=0"
  log "installing ${NODE_PACKAGES[*]} (Debian packages)"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${NODE_PACKAGES[@]}"; } >"$CACHE/apt.log" 2>&1 ||
    { tail -20 "$CACHE/apt.log" >&2; die "apt-get install failed (log: $CACHE/apt.log)"; }
}

source_key() { # files... -> a short digest: the cache key of binaries built from our own sources
  cat "$@" | sha256sum | cut -c1-12
}

# The pause image: the sandbox every pod's containers join.
PAUSE_IMAGE=localhost/pause:testbed
# The node-driver-registrar's stand-in, for the chart's CSI DaemonSet.
REGISTRAR_IMAGE=localhost/csi-node-driver-registrar:testbed

node_build() {
  node_packages
  local kver=$1
  go_build kubelet kubernetes k8s.io/kubernetes/cmd/kubelet "$K8S_VERSION" "$kver"
  go_build kube-proxy kubernetes k8s.io/kubernetes/cmd/kube-proxy "$K8S_VERSION" "$kver"
  local g=$HERE/go/kubernetes
  go_build fakegpu kubernetes sdfleet.test/testbed/kubernetes/fakegpu "$(source_key "$g/fakegpu/main.go" "$g/go.sum")"
  go_build fakes3csi kubernetes sdfleet.test/testbed/kubernetes/fakes3csi "$(source_key "$g/fakes3csi/main.go" "$g/go.sum")"
  go_build hostproxy kubernetes sdfleet.test/testbed/kubernetes/hostproxy "$(source_key "$g/hostproxy/main.go")"
  local key w; key=$(source_key "$HERE/pause.c")
  PAUSE_TAR=$CACHE/images/pause-$key.oci.tar
  if [ ! -f "$PAUSE_TAR" ]; then
    log "building the pause image"
    w=$(mktemp -d)
    gcc -static -Os -o "$w/pause" "$HERE/pause.c" || die "building pause failed"
    binary_image "$w/pause" 65535:65535 "$PAUSE_TAR"
    rm -rf "$w"
  fi
  # The stand-in for the node-driver-registrar sidecar (go/kubernetes/csiregistrar), as
  # an image: the chart's CSI DaemonSet runs it beside the csi.sdfleet.io plugin.
  key=$(source_key "$g/csiregistrar/main.go" "$g/go.sum")
  CGO_ENABLED=0 go_build csiregistrar kubernetes sdfleet.test/testbed/kubernetes/csiregistrar "$key"
  REGISTRAR_TAR=$CACHE/images/csiregistrar-$key.oci.tar
  [ -f "$REGISTRAR_TAR" ] || binary_image "$BIN/csiregistrar-$key" 0:0 "$REGISTRAR_TAR"
}

binary_image() { # static-binary user tar: an OCI layout (tag testbed) with only the binary, as its entrypoint
  local w; w=$(mktemp -d)
  local name; name=$(basename "$1"); name=${name%%-*}
  umoci init --layout "$w/layout" >/dev/null
  umoci new --image "$w/layout:testbed"
  umoci unpack --image "$w/layout:testbed" "$w/bundle" >/dev/null
  install -m 0755 "$1" "$w/bundle/rootfs/$name"
  umoci repack --image "$w/layout:testbed" "$w/bundle" >/dev/null
  umoci config --image "$w/layout:testbed" --config.entrypoint "/$name" --config.user "$2"
  umoci gc --layout "$w/layout"
  mkdir -p "$(dirname "$3")"
  tar -C "$w/layout" -cf "$3.tmp.$$" . && mv -f "$3.tmp.$$" "$3"
  rm -rf "$w"
}

node_pki() { # in $STATE/pki, with sign() of pki()
  sign node "/O=system:nodes/CN=system:node:$NODE_NAME" "extendedKeyUsage=clientAuth"
  sign kubelet "/CN=$NODE_NAME" "subjectAltName=IP:$NODE_BRIDGE_IP,DNS:$NODE_NAME
extendedKeyUsage=serverAuth"
  sign kube-proxy "/CN=system:kube-proxy" "extendedKeyUsage=clientAuth"
}

user_kubeconfig() { # path port user
  cat >"$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: testbed
  cluster:
    server: https://127.0.0.1:$2
    certificate-authority: $STATE/pki/ca.crt
users:
- name: $3
  user:
    client-certificate: $STATE/pki/$3.crt
    client-key: $STATE/pki/$3.key
contexts:
- name: testbed
  context: {cluster: testbed, user: $3}
current-context: testbed
EOF
}

ctr_node() { ctr --address "$STATE/node/containerd.sock" -n k8s.io "$@"; }

node_up() {
  . "$STATE/ports.env"
  local n=$STATE/node p=$STATE/pki
  mkdir -p "$n"/{cni,cni-ipam,kubelet,pod-logs,containerd}
  local d
  for d in "${NODE_HOST_DIRS[@]}"; do [ -e "$d" ] || echo "$d" >>"$n/created-host-dirs"; done

  # The pod network: a bridge no packet leaves the host through.
  ip link show "$NODE_BRIDGE" >/dev/null 2>&1 || ip link add "$NODE_BRIDGE" type bridge
  ip addr replace "$NODE_BRIDGE_IP/24" dev "$NODE_BRIDGE"
  ip link set "$NODE_BRIDGE" up
  echo 1 >"/proc/sys/net/ipv4/conf/$NODE_BRIDGE/forwarding"
  iptables -w -C FORWARD -i "$NODE_BRIDGE" ! -o "$NODE_BRIDGE" -j DROP -m comment --comment sdfleet-testbed 2>/dev/null ||
    iptables -w -I FORWARD -i "$NODE_BRIDGE" ! -o "$NODE_BRIDGE" -j DROP -m comment --comment sdfleet-testbed
  cat >"$n/cni/10-sdfleet.conflist" <<EOF
{"cniVersion": "0.4.0", "name": "sdfleet-testbed", "plugins": [
  {"type": "bridge", "bridge": "$NODE_BRIDGE", "isGateway": false, "ipMasq": false, "hairpinMode": true,
   "ipam": {"type": "host-local", "dataDir": "$n/cni-ipam",
            "ranges": [[{"subnet": "$NODE_POD_CIDR", "rangeStart": "10.88.0.10", "rangeEnd": "10.88.0.250"}]],
            "routes": [{"dst": "10.0.0.0/24", "gw": "$NODE_BRIDGE_IP"}]}}
]}
EOF

  cat >"$n/containerd.toml" <<EOF
version = 2
root = "$n/containerd/root"
state = "$n/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "$n/containerd.sock"
[plugins."io.containerd.internal.v1.opt"]
  path = "$n/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  # The VM's bounding set lacks CAP_SYS_RESOURCE: runc would fail writing oom_score_adj.
  restrict_oom_score_adj = true
  disable_apparmor = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$n/cni"
EOF
  start containerd "$(command -v containerd)" --config "$n/containerd.toml"
  wait_for containerd 30 ctr_node version
  # The layout's ref is the tag; --base-name gives it the repository.
  ctr_node images import --base-name "${PAUSE_IMAGE%:*}" "$PAUSE_TAR" >/dev/null
  # Not `grep -q`: it exits at the first match, ctr gets SIGPIPE and pipefail fails the
  # check although the image is there (seen once the node held more images).
  ctr_node images ls -q | grep -x "$PAUSE_IMAGE" >/dev/null || die "the pause image did not import as $PAUSE_IMAGE: $(ctr_node images ls -q | tr '\n' ' ')"
  ctr_node images import --base-name "${REGISTRAR_IMAGE%:*}" "$REGISTRAR_TAR" >/dev/null

  # Pods reach the apiserver (through the `kubernetes` Service), moto and PostgreSQL here.
  start hostproxy "$BIN/hostproxy-$(source_key "$HERE/go/kubernetes/hostproxy/main.go")" \
    -listen "$NODE_BRIDGE_IP" -port "$APISERVER_PORT" -port "$MOTO_PORT" -port "$POSTGRES_PORT"
  kctl apply --server-side --force-conflicts -f - >/dev/null <<EOF
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: kubernetes
  namespace: default
  labels: {kubernetes.io/service-name: kubernetes, endpointslice.kubernetes.io/managed-by: testbed.sdfleet.io}
addressType: IPv4
endpoints:
- addresses: ["$NODE_BRIDGE_IP"]
  conditions: {ready: true}
ports:
- {name: https, port: $APISERVER_PORT, protocol: TCP}
EOF

  node_pod_identity
  user_kubeconfig "$n/kube-proxy.kubeconfig" "$APISERVER_PORT" kube-proxy
  cat >"$n/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: $n/kube-proxy.kubeconfig}
hostnameOverride: $NODE_NAME
bindAddress: $NODE_BRIDGE_IP
healthzBindAddress: 127.0.0.1:$KUBE_PROXY_HEALTH_PORT
metricsBindAddress: 127.0.0.1:$KUBE_PROXY_METRICS_PORT
mode: iptables
clusterCIDR: $NODE_POD_CIDR
# Every Service connection is masqueraded: replies come back through the host, which
# undoes the DNAT, without bridge netfilter (a host-wide switch) turned on.
iptables: {masqueradeAll: true, syncPeriod: 10s, minSyncPeriod: 0s}
# 0: leave the host's conntrack settings as they are.
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
nodePortAddresses: ["$NODE_BRIDGE_IP/32"]
EOF
  start kube-proxy "$BIN/kube-proxy-$K8S_VERSION" --config "$n/kube-proxy.yaml"

  user_kubeconfig "$n/kubelet.kubeconfig" "$APISERVER_PORT" node
  cat >"$n/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $NODE_BRIDGE_IP
port: $KUBELET_PORT
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: $KUBELET_HEALTH_PORT
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $p/ca.crt}
authorization: {mode: Webhook}
tlsCertFile: $p/kubelet.crt
tlsPrivateKeyFile: $p/kubelet.key
containerRuntimeEndpoint: unix://$n/containerd.sock
cgroupDriver: cgroupfs
# This machine has cgroup v1 and no systemd: no QoS hierarchy, nothing reserved.
failCgroupV1: false
cgroupsPerQOS: false
enforceNodeAllocatable: []
failSwapOn: false
podLogsDir: $n/pod-logs
maxPods: 40
serializeImagePulls: false
# Images are imported, never pulled: garbage collection must not remove them.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%"}
registerWithTaints:
- {key: $NODE_TAINT, effect: NoSchedule}
- {key: nvidia.com/gpu, effect: NoSchedule}
EOF
  start kubelet "$BIN/kubelet-$K8S_VERSION" --config "$n/kubelet.yaml" --kubeconfig "$n/kubelet.kubeconfig" \
    --root-dir "$n/kubelet" --hostname-override "$NODE_NAME" --node-ip "$NODE_BRIDGE_IP" \
    --node-labels "node.kubernetes.io/instance-type=$NODE_INSTANCE_TYPE,karpenter.sh/capacity-type=on-demand,topology.kubernetes.io/zone=us-west-2a,topology.kubernetes.io/region=us-west-2,nvidia.com/gpu.present=true,sdfleet.io/testbed-role=real-gpu"
  start fakegpu "$BIN/fakegpu-$(source_key "$HERE/go/kubernetes/fakegpu/main.go" "$HERE/go/kubernetes/go.sum")" --count 1
  mkdir -p "$n/kubelet/plugins_registry" "$n/kubelet/plugins/s3.csi.aws.com" "$n/s3-volumes"
  start fakes3csi "$BIN/fakes3csi-$(source_key "$HERE/go/kubernetes/fakes3csi/main.go" "$HERE/go/kubernetes/go.sum")" \
    --registration-dir "$n/kubelet/plugins_registry" --csi-socket "$n/kubelet/plugins/s3.csi.aws.com/csi.sock" \
    --data-dir "$n/s3-volumes" --node-id "$NODE_NAME"
}

# The testbed's stand-in for EKS Pod Identity: on EKS, a webhook gives a pod whose
# ServiceAccount has an association the variables that lead the AWS SDK to the Pod
# Identity agent's credentials. Here pods in a namespace labelled
# testbed.sdfleet.io/pod-identity=moto get moto's endpoint (as pods see it) and its test
# credentials, from a MutatingAdmissionPolicy (CEL, in the apiserver; no webhook to run).
node_pod_identity() {
  local env="[
        Object.spec.containers.env{name: 'AWS_ENDPOINT_URL', value: 'http://$NODE_BRIDGE_IP:$MOTO_PORT'},
        Object.spec.containers.env{name: 'AWS_ACCESS_KEY_ID', value: 'testing'},
        Object.spec.containers.env{name: 'AWS_SECRET_ACCESS_KEY', value: 'testing'},
        Object.spec.containers.env{name: 'AWS_REGION', value: 'us-west-2'},
        Object.spec.containers.env{name: 'AWS_EC2_METADATA_DISABLED', value: 'true'}]"
  kctl apply --server-side --force-conflicts -f - >/dev/null <<EOF
apiVersion: admissionregistration.k8s.io/v1beta1
kind: MutatingAdmissionPolicy
metadata: {name: testbed-pod-identity}
spec:
  matchConstraints:
    namespaceSelector: {matchLabels: {testbed.sdfleet.io/pod-identity: moto}}
    resourceRules:
    - {apiGroups: [""], apiVersions: [v1], operations: [CREATE], resources: [pods]}
  failurePolicy: Fail
  reinvocationPolicy: Never
  mutations:
  - patchType: ApplyConfiguration
    applyConfiguration:
      expression: >
        Object{spec: Object.spec{containers: object.spec.containers.map(c,
          Object.spec.containers{name: c.name, env: $env})}}
  - patchType: ApplyConfiguration
    applyConfiguration:
      expression: >
        Object{spec: Object.spec{initContainers: object.spec.?initContainers.orValue([]).map(c,
          Object.spec.initContainers{name: c.name, env: ${env//containers.env/initContainers.env}})}}
---
apiVersion: admissionregistration.k8s.io/v1beta1
kind: MutatingAdmissionPolicyBinding
metadata: {name: testbed-pod-identity}
spec: {policyName: testbed-pod-identity}
EOF
}

node_wait() {
  wait_for kube-proxy 60 curl -sf --max-time 2 "http://127.0.0.1:$KUBE_PROXY_HEALTH_PORT/healthz"
  wait_for kubelet 90 kctl wait --for=condition=Ready --timeout=2s "node/$NODE_NAME"
  wait_for fakegpu 60 node_has_gpu
  wait_for fakes3csi 60 node_has_s3_driver
}

node_has_s3_driver() {
  kctl get csinode "$NODE_NAME" -o jsonpath='{.spec.drivers[*].name}' | grep -w s3.csi.aws.com >/dev/null
}

node_has_gpu() {
  [ "$(kctl get node "$NODE_NAME" -o jsonpath='{.status.allocatable.nvidia\.com/gpu}')" = 1 ]
}

node_down() {
  local n=$STATE/node
  [ -d "$n" ] || return 0
  # 1. Pods first, while the kubelet runs to stop them (their volumes unmounted, their
  #    sandboxes' network torn down by CNI).
  if alive kubelet && alive kube-apiserver; then
    kctl delete pods --all-namespaces --field-selector "spec.nodeName=$NODE_NAME" \
      --grace-period=2 --wait=true --timeout=40s >/dev/null 2>&1 || log "some pods on $NODE_NAME did not stop in 40 s"
  fi
  stop_named fakegpu kubelet fakes3csi
  alive kube-apiserver && kctl delete node "$NODE_NAME" --wait=false >/dev/null 2>&1 || true
  # 2. Whatever the kubelet left: tasks, containers, then containerd and its shims.
  if alive containerd; then
    local id
    for id in $(ctr_node tasks ls -q 2>/dev/null); do ctr_node tasks kill -s SIGKILL "$id" >/dev/null 2>&1 || true; done
    sleep 0.5
    for id in $(ctr_node tasks ls -q 2>/dev/null); do ctr_node tasks delete -f "$id" >/dev/null 2>&1 || true; done
    for id in $(ctr_node containers ls -q 2>/dev/null); do ctr_node containers delete "$id" >/dev/null 2>&1 || true; done
  fi
  stop_named containerd hostproxy
  local pid
  for pid in $(pgrep -f "containerd-shim-runc-v2 .*-address $n/containerd.sock" || true); do kill -KILL "$pid" 2>/dev/null || true; done
  # 3. kube-proxy, and its rules (and the kubelet's canary chains).
  stop_named kube-proxy
  [ -x "$BIN/kube-proxy-$K8S_VERSION" ] && "$BIN/kube-proxy-$K8S_VERSION" --cleanup >/dev/null 2>&1 || true
  local table chain rule
  for table in mangle nat filter; do
    # Jumps into the chains from the built-in ones first (a referenced chain cannot go).
    { iptables -w -t "$table" -S 2>/dev/null | grep -E '^-A [A-Z]+ .*-j KUBE-' || true; } | while read -r rule; do
      eval "iptables -w -t $table -D ${rule#-A }" 2>/dev/null || true
    done
    for chain in $(iptables -w -t "$table" -S 2>/dev/null | awk '$1 == "-N" && $2 ~ /^KUBE-/ { print $2 }'); do
      iptables -w -t "$table" -F "$chain" 2>/dev/null || true
    done
    for chain in $(iptables -w -t "$table" -S 2>/dev/null | awk '$1 == "-N" && $2 ~ /^KUBE-/ { print $2 }'); do
      iptables -w -t "$table" -X "$chain" 2>/dev/null || true
    done
  done
  while iptables -w -D FORWARD -i "$NODE_BRIDGE" ! -o "$NODE_BRIDGE" -j DROP -m comment --comment sdfleet-testbed 2>/dev/null; do :; done
  # 4. Mounts under the node's state (the kubelet bind-mounts its root onto itself; pod
  #    volumes; containerd's rootfs mounts), deepest first; network namespaces; the bridge.
  local m
  for m in $(awk -v s="$n" 'index($2, s) == 1 { print $2 }' /proc/self/mounts | sort -r); do
    umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
  done
  for m in /run/netns/cni-*; do
    [ -e "$m" ] || continue
    umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
    rm -f "$m"
  done
  ip link del "$NODE_BRIDGE" 2>/dev/null || true
  # 5. Container cgroups (outside the session's cgroup when cgroupsPerQOS is off).
  node_cgroups | while read -r cg; do rmdir "$cg" 2>/dev/null || true; done
  rm -rf /var/lib/kubelet/device-plugins/sdfleet-fakegpu.sock
  if [ -f "$n/created-host-dirs" ]; then
    while read -r d; do rm -rf "$d"; done <"$n/created-host-dirs"
  fi
}

node_cgroups() { # the containers' cgroup directories, deepest first
  find /sys/fs/cgroup/*/ -mindepth 1 -maxdepth 3 -type d -path '*/k8s.io*' 2>/dev/null | sort -r
}

# Fails, naming each, if anything of the real node survived `down`: a process, a mount, a
# network namespace, the bridge, a cgroup, an iptables chain of kube-proxy or the kubelet.
check_clean() {
  local bad=0 what
  what=$(pgrep -a -f "$BIN/|containerd-shim-runc-v2|containerd --config .*/.testbed" || true)
  [ -z "$what" ] || { echo "processes left: $what"; bad=1; }
  what=$(awk -v s="$STATE" 'index($2, s) == 1 || $2 ~ /^\/run\/netns\/cni-/ { print $2 }' /proc/self/mounts)
  [ -z "$what" ] || { echo "mounts left: $what"; bad=1; }
  what=$(ls /run/netns 2>/dev/null | grep '^cni-' || true)
  [ -z "$what" ] || { echo "network namespaces left: $what"; bad=1; }
  ip link show "$NODE_BRIDGE" >/dev/null 2>&1 && { echo "bridge left: $NODE_BRIDGE"; bad=1; }
  what=$(node_cgroups)
  [ -z "$what" ] || { echo "cgroups left: $what"; bad=1; }
  what=$(iptables-save 2>/dev/null | grep -E '^:KUBE-|sdfleet-testbed' || true)
  [ -z "$what" ] || { echo "iptables left: $what"; bad=1; }
  [ -e "$STATE" ] && { echo "state left: $STATE"; bad=1; }
  what=$(pgrep -a -f "postgres -D $(pg_dir)" || true)
  [ -z "$what" ] || { echo "processes left: $what"; bad=1; }
  [ -e "$(pg_dir)" ] && { echo "PostgreSQL cluster left: $(pg_dir)"; bad=1; }
  [ $bad = 0 ] && echo "clean: no process, mount, network namespace, bridge, cgroup or iptables chain of the testbed left"
  return $bad
}
