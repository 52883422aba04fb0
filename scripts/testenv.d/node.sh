# shellcheck shell=bash
# Sourced by scripts/testenv: one real node for a 'new+node' cluster.
#
# The node is this machine: a containerd and a kubelet of its own (own
# sockets, state, cgroup root and CNI bridge, so several clusters and test
# runs can each have one), kube-scheduler, the test CSI driver (ferry-csi)
# with the upstream external-provisioner, csi-snapshotter,
# snapshot-controller and external-snapshot-metadata sidecar (changed-block
# tracking), a StorageClass and a VolumeSnapshotClass for it, and
# three images built here and imported, never pulled: the pause image, a
# busybox image and a Ferry image.
#
# Security as in production: the kubelet authenticates to the API server
# with a client certificate (system:node:NAME, authorized by the Node
# authorizer and NodeRestriction), serves a certificate of the cluster CA,
# and authorizes the API server's own client certificate through the API
# server (webhook); anonymous requests are refused.
#
# Network: Pods get addresses on a bridge that only this node is on, with no
# default route and no forwarding or masquerading out of it; the node's IP
# is the bridge's, and the API server of the cluster listens there. Pods
# reach it in-cluster at the 'kubernetes' Service address, which the node
# translates (one DNAT rule) to the API server. Pods resolve no names (their resolv.conf points at their
# own loopback), and containerd is given an unreachable loopback proxy, so
# an image missing by mistake fails at once instead of being looked up
# outside.

NODE_IMAGE_PAUSE=ferry.test/pause:3.10
NODE_IMAGE_BUSYBOX=ferry.test/busybox:1.35
NODE_IMAGE_FERRY=ferry.test/ferry:dev
NODE_IMAGE_POSTGRES=ferry.test/postgres:15
CSI_DRIVER=csi.ferry.dev
CSI_STORAGE_CLASS=ferry-csi
CSI_SNAPSHOT_CLASS=ferry-csi
# The CSI sidecars and the snapshot controller run as this token user.
CSI_USER=ferry-testenv:csi
# Backup clients mint their tokens for the snapshot metadata sidecar with
# this audience (it is in the SnapshotMetadataService).
SNAPSHOT_METADATA_AUDIENCE="ferry-testenv-snapshot-metadata"

# Kubernetes refuses these sockets past 107 bytes; say so before anything
# starts instead of failing deep inside containerd.
node_check_paths() {
  local d=$1
  local longest="$d/kubelet/plugins_registry/$CSI_DRIVER-reg.sock"
  ((${#longest} < 100)) || die "state directory $STATE is too deep for Unix sockets (${#longest} bytes in $longest): set FERRY_TESTENV_DIR to a shorter path"
}

# node_allocate DIR: a /24 and a bridge that no other running test node
# uses, under a machine-wide lock so parallel 'up's get different ones.
node_allocate() {
  local d=$1 n
  mkdir -p /run/lock
  exec {lockfd}>/run/lock/ferry-testenv-node.lock
  flock "$lockfd"
  for n in $(seq 10 250); do
    ip link show "ferry$n" >/dev/null 2>&1 && continue
    ip -4 addr show | grep -q "inet 10\.244\.$n\." && continue
    ip link add "ferry$n" type bridge
    ip addr add "10.244.$n.1/24" dev "ferry$n"
    ip link set "ferry$n" up
    echo "$n" > "$d/node/subnet"
    flock -u "$lockfd"; exec {lockfd}>&-
    return
  done
  flock -u "$lockfd"; exec {lockfd}>&-
  die "no free 10.244.N.0/24 for a test node bridge (10..250 are taken)"
}

# sign_cert DIR NAME SUBJECT EXTENSIONS: an EC key and a certificate of the
# cluster CA in DIR/NAME.{key,crt}.
sign_cert() {
  local d=$1 name=$2 subject=$3 ext=$4
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "$subject" \
    -keyout "$d/$name.key" -out "$d/$name.csr" 2>/dev/null
  printf '%b' "$ext" > "$d/$name.ext"
  openssl x509 -req -in "$d/$name.csr" -CA "$d/ca.crt" -CAkey "$d/ca.key" -CAcreateserial \
    -days 3650 -extfile "$d/$name.ext" -out "$d/$name.crt" 2>/dev/null
}

# node_prepare DIR NAME: the node's name, subnet and bridge.
node_prepare() {
  local d=$1 name=$2
  mkdir -p "$d/node"
  node_check_paths "$d"
  node_allocate "$d"
  local n
  n=$(cat "$d/node/subnet")
  echo "$name-node" > "$d/node/name"; echo "10.244.$n.1" > "$d/node/ip"
}

# node_certificates DIR: the kubelet's client and serving certificates and
# the API server's client certificate for kubelets, from the cluster CA.
node_certificates() {
  local d=$1 ip node
  node=$(cat "$d/node/name"); ip=$(cat "$d/node/ip")
  local client='basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n'
  sign_cert "$d/pki" kubelet-client "/O=system:nodes/CN=system:node:$node" "$client"
  sign_cert "$d/pki" kubelet-serving "/CN=$node" \
    "subjectAltName=IP:$ip,DNS:$node\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n"
  sign_cert "$d/pki" apiserver-kubelet-client "/CN=kube-apiserver-kubelet-client" "$client"
}

# node_snapshot_metadata_pki DIR: the TLS identity of the snapshot metadata
# sidecar, in DIR/snapshot-metadata: a CA of its own (which the
# SnapshotMetadataService publishes to backup clients, as a production
# driver's does) and a server certificate for the node's address, where
# both the host and the node's Pods reach the sidecar. Also its gRPC port.
node_snapshot_metadata_pki() {
  local d=$1 ip dir="$1/snapshot-metadata"
  ip=$(cat "$d/node/ip")
  mkdir -p "$dir"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 3650 \
    -subj "/CN=ferry-testenv-snapshot-metadata-ca" -keyout "$dir/ca.key" -out "$dir/ca.crt" 2>/dev/null
  sign_cert "$dir" server "/CN=csi-snapshot-metadata" \
    "subjectAltName=IP:$ip\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n"
  free_port > "$dir/port"
}

node_apiserver_flags() {
  local d=$1
  printf '%s\n' --authorization-mode Node,RBAC --enable-admission-plugins NodeRestriction \
    --kubelet-client-certificate "$d/pki/apiserver-kubelet-client.crt" --kubelet-client-key "$d/pki/apiserver-kubelet-client.key" \
    --kubelet-certificate-authority "$d/pki/ca.crt" --kubelet-preferred-address-types InternalIP
}

# The controllers a node needs on top of the node-less set: volume binding
# and expansion, attach/detach, node lifecycle (which lifts the not-ready
# taint a new node registers with), endpoints and Pod garbage collection.
NODE_CONTROLLERS=persistentvolume-binder,persistentvolume-expander,attachdetach,nodelifecycle,endpoint,endpointslice,podgc,ttl-after-finished,ephemeral-volume

api_yaml() { # api_yaml CLUSTER_DIR PATH FILE: POST a YAML document
  local d=$1 path=$2 file=$3
  curl -sS --fail-with-body --cacert "$d/pki/ca.crt" -H "Authorization: Bearer $(cat "$d/$ADMIN_TOKEN_FILE")" \
    -H 'Content-Type: application/yaml' -X POST --data-binary "@$file" "$(cat "$d/server")$path"
}

# node_cluster_objects DIR: what the API needs before the node starts: the
# API server's access to kubelets, the CSI user's role, the snapshot CRDs,
# the CSIDriver, the storage class, the (group) snapshot classes and the
# SnapshotMetadataService.
node_cluster_objects() {
  local d=$1 crds=$2
  api "$d" POST /apis/rbac.authorization.k8s.io/v1/clusterrolebindings \
    '{"apiVersion":"rbac.authorization.k8s.io/v1","kind":"ClusterRoleBinding","metadata":{"name":"ferry-testenv:apiserver-kubelet"},"roleRef":{"apiGroup":"rbac.authorization.k8s.io","kind":"ClusterRole","name":"system:kubelet-api-admin"},"subjects":[{"apiGroup":"rbac.authorization.k8s.io","kind":"User","name":"kube-apiserver-kubelet-client"}]}' >/dev/null
  local crd
  for crd in "$crds"/*.yaml; do
    api_yaml "$d" /apis/apiextensions.k8s.io/v1/customresourcedefinitions "$crd" >/dev/null
  done
  local tmp="$d/node/objects.yaml"
  cat > "$tmp" <<YAML
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: "$CSI_USER"}
rules:
- apiGroups: [""]
  resources: [persistentvolumes]
  verbs: [get, list, watch, create, delete, patch, update]
- apiGroups: [""]
  resources: [persistentvolumeclaims, persistentvolumeclaims/status]
  verbs: [get, list, watch, update, patch]
- apiGroups: [""]
  resources: [events]
  verbs: [get, list, watch, create, update, patch]
- apiGroups: [""]
  resources: [nodes, secrets]
  verbs: [get, list, watch]
- apiGroups: [storage.k8s.io]
  resources: [storageclasses, csinodes, volumeattachments, volumeattributesclasses]
  verbs: [get, list, watch]
- apiGroups: [snapshot.storage.k8s.io, groupsnapshot.storage.k8s.io]
  resources: ["*"]
  verbs: ["*"]
# The snapshot metadata sidecar authenticates each client's token
# (TokenReview), asks whether that client may get VolumeSnapshots in the
# namespace (SubjectAccessReview) and reads the audience from its
# SnapshotMetadataService.
- apiGroups: [authentication.k8s.io]
  resources: [tokenreviews]
  verbs: [create]
- apiGroups: [authorization.k8s.io]
  resources: [subjectaccessreviews]
  verbs: [create]
- apiGroups: [cbt.storage.k8s.io]
  resources: [snapshotmetadataservices]
  verbs: [get, list, watch]
YAML
  api_yaml "$d" /apis/rbac.authorization.k8s.io/v1/clusterroles "$tmp" >/dev/null
  api "$d" POST /apis/rbac.authorization.k8s.io/v1/clusterrolebindings \
    '{"apiVersion":"rbac.authorization.k8s.io/v1","kind":"ClusterRoleBinding","metadata":{"name":"'"$CSI_USER"'"},"roleRef":{"apiGroup":"rbac.authorization.k8s.io","kind":"ClusterRole","name":"'"$CSI_USER"'"},"subjects":[{"apiGroup":"rbac.authorization.k8s.io","kind":"User","name":"'"$CSI_USER"'"}]}' >/dev/null
  api "$d" POST /apis/storage.k8s.io/v1/csidrivers \
    '{"apiVersion":"storage.k8s.io/v1","kind":"CSIDriver","metadata":{"name":"'"$CSI_DRIVER"'"},"spec":{"attachRequired":false,"podInfoOnMount":false,"fsGroupPolicy":"File","volumeLifecycleModes":["Persistent"]}}' >/dev/null
  api "$d" POST /apis/storage.k8s.io/v1/storageclasses \
    '{"apiVersion":"storage.k8s.io/v1","kind":"StorageClass","metadata":{"name":"'"$CSI_STORAGE_CLASS"'","annotations":{"storageclass.kubernetes.io/is-default-class":"true"}},"provisioner":"'"$CSI_DRIVER"'","reclaimPolicy":"Delete","volumeBindingMode":"Immediate","allowVolumeExpansion":false}' >/dev/null
  # The CRD must be established before its first object.
  wait_until 30 "VolumeSnapshotClass CRD of $(basename "$d")" "$d/apiserver.log" "$d/apiserver.pid" \
    api "$d" POST /apis/snapshot.storage.k8s.io/v1/volumesnapshotclasses \
    '{"apiVersion":"snapshot.storage.k8s.io/v1","kind":"VolumeSnapshotClass","metadata":{"name":"'"$CSI_SNAPSHOT_CLASS"'","annotations":{"snapshot.storage.kubernetes.io/is-default-class":"true"}},"driver":"'"$CSI_DRIVER"'","deletionPolicy":"Delete"}'
  # The driver serves the CSI group controller: crash-consistent snapshots
  # of several volumes at once (VolumeGroupSnapshot).
  wait_until 30 "VolumeGroupSnapshotClass CRD of $(basename "$d")" "$d/apiserver.log" "$d/apiserver.pid" \
    api "$d" POST /apis/groupsnapshot.storage.k8s.io/v1/volumegroupsnapshotclasses \
    '{"apiVersion":"groupsnapshot.storage.k8s.io/v1","kind":"VolumeGroupSnapshotClass","metadata":{"name":"'"$CSI_SNAPSHOT_CLASS"'","annotations":{"groupsnapshot.storage.kubernetes.io/is-default-class":"true"}},"driver":"'"$CSI_DRIVER"'","deletionPolicy":"Delete"}'
  # How a backup client finds the driver's changed-block service: named
  # after the driver, with the address, the CA to verify it and the
  # audience its ServiceAccount tokens must be minted for.
  local sms="$d/snapshot-metadata" ca
  ca=$(base64 -w0 "$sms/ca.crt")
  wait_until 30 "SnapshotMetadataService CRD of $(basename "$d")" "$d/apiserver.log" "$d/apiserver.pid" \
    api "$d" POST /apis/cbt.storage.k8s.io/v1beta1/snapshotmetadataservices \
    '{"apiVersion":"cbt.storage.k8s.io/v1beta1","kind":"SnapshotMetadataService","metadata":{"name":"'"$CSI_DRIVER"'"},"spec":{"address":"'"$(cat "$d/node/ip"):$(cat "$sms/port")"'","caCert":"'"$ca"'","audience":"'"$SNAPSHOT_METADATA_AUDIENCE"'"}}'
}

# node_images DIR BIN FERRY_BINARY: the pause, busybox, PostgreSQL and Ferry
# images as OCI archives, imported into the node's containerd.
node_images() {
  local d=$1 bin=$2 ferry=$3 images="$d/node/images"
  mkdir -p "$images"
  python3 "$here/testenv.d/image.py" "$NODE_IMAGE_PAUSE" "$images/pause.tar" --file "$bin/pause:/pause" --entrypoint '["/pause"]'
  local busybox=/bin/busybox applets=() a
  [[ -x $busybox ]] || die "$busybox is missing: apt-get install busybox-static"
  for a in sh ash cat cp dd echo env false grep head hostname id ls md5sum mkdir mv printf ps rm sed seq sha256sum sleep stat sync tail tee test touch true wc; do
    applets+=(--link "/bin/busybox:/bin/$a")
  done
  python3 "$here/testenv.d/image.py" "$NODE_IMAGE_BUSYBOX" "$images/busybox.tar" --file "$busybox:/bin/busybox" "${applets[@]}" --cmd '["sh"]'
  node_postgres_image "$images" "$busybox"
  local imports=(pause busybox postgres)
  if [[ -n $ferry ]]; then
    # The binary without its debug sections, and the libraries it links.
    local stripped="$images/ferry" libs=() lib
    objcopy --strip-debug "$ferry" "$stripped" 2>/dev/null || cp "$ferry" "$stripped"
    while read -r lib; do
      [[ -n $lib ]] && libs+=(--file "$(readlink -f "$lib"):$lib:0755")
    done < <(ldd "$ferry" | grep -o '/[^ ]*' | sort -u)
    # The system's CA bundle, as a production image carries one: S3 and
    # cloud endpoints are reached over TLS.
    local bundle=/etc/ssl/certs/ca-certificates.crt
    [[ -f $bundle ]] || die "$bundle is missing: apt-get install ca-certificates"
    libs+=(--file "$bundle:$bundle:0644")
    python3 "$here/testenv.d/image.py" "$NODE_IMAGE_FERRY" "$images/ferry.tar" --file "$stripped:/usr/local/bin/ferry" "${libs[@]}" \
      --entrypoint '["/usr/local/bin/ferry"]'
    imports+=(ferry)
  fi
  local image
  local -A refs=([pause]=$NODE_IMAGE_PAUSE [busybox]=$NODE_IMAGE_BUSYBOX [postgres]=$NODE_IMAGE_POSTGRES [ferry]=$NODE_IMAGE_FERRY)
  for image in "${imports[@]}"; do
    ctr --address "$d/containerd/containerd.sock" --namespace k8s.io images import "$images/$image.tar" >/dev/null
    # Pinned: the kubelet's image garbage collection (on a disk filling up)
    # never removes an image that cannot be pulled again.
    ctr --address "$d/containerd/containerd.sock" --namespace k8s.io images label "${refs[$image]}" io.cri-containerd.pinned=pinned >/dev/null
  done
}

# node_postgres_image IMAGES BUSYBOX: a real database for the volume tests,
# PostgreSQL 15 from Debian's package: its server, initdb and psql with the
# libraries they link, its extension libraries and share files (JIT left
# out), UTC time zone data, a 'postgres' user (uid 999) and busybox's shell
# tools. PGDATA is /var/lib/postgresql/data/pgdata.
node_postgres_image() {
  local images=$1 busybox=$2 pg=/usr/lib/postgresql/15 files=() f a
  [[ -x $pg/bin/postgres ]] || die "$pg/bin/postgres is missing: apt-get install postgresql-15"
  local bins=("$pg/bin/postgres" "$pg/bin/initdb" "$pg/bin/pg_ctl" "$pg/bin/psql" "$pg/bin/pg_isready")
  for f in "${bins[@]}"; do files+=(--file "$f:$f:0755"); done
  while read -r f; do
    [[ -n $f ]] && files+=(--file "$(readlink -f "$f"):$f:0755")
  done < <(ldd "${bins[@]}" "$pg"/lib/plpgsql.so "$pg"/lib/dict_snowball.so | grep -o '/[^ ]*' | grep -v "^$pg" | sort -u)
  for f in "$pg"/lib/*.so; do
    [[ $f == */llvmjit.so ]] || files+=(--file "$f:$f:0755")
  done
  while read -r f; do files+=(--file "$f:$f:0644"); done < <(find /usr/share/postgresql/15 -type f)
  files+=(--file "/usr/share/zoneinfo/Etc/UTC:/usr/share/zoneinfo/Etc/UTC:0644" --link "Etc/UTC:/usr/share/zoneinfo/UTC")
  printf 'root:x:0:0:root:/root:/bin/sh\npostgres:x:999:999:PostgreSQL:/var/lib/postgresql:/bin/sh\n' > "$images/passwd"
  printf 'root:x:0:\npostgres:x:999:\n' > "$images/group"
  files+=(--file "$images/passwd:/etc/passwd:0644" --file "$images/group:/etc/group:0644" --file "$busybox:/bin/busybox")
  for a in sh cat chown echo head id ls md5sum mkdir rm sleep test; do files+=(--link "/bin/busybox:/bin/$a"); done
  python3 "$here/testenv.d/image.py" "$NODE_IMAGE_POSTGRES" "$images/postgres.tar" "${files[@]}" \
    --env "PATH=$pg/bin:/usr/local/bin:/usr/bin:/bin" --env TZ=UTC --env PGDATA=/var/lib/postgresql/data/pgdata \
    --cmd '["postgres"]'
}

node_containerd() {
  local d=$1 n=$2 c="$d/containerd"
  mkdir -p "$c" "$d/cni/net.d"
  cat > "$d/cni/net.d/10-ferry.conflist" <<JSON
{"cniVersion": "1.0.0", "name": "ferry$n", "plugins": [
  {"type": "bridge", "bridge": "ferry$n", "isGateway": false, "ipMasq": false, "hairpinMode": true,
   "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.244.$n.0/24", "rangeStart": "10.244.$n.10"}]],
            "routes": [{"dst": "$SERVICE_CIDR"}], "dataDir": "$d/cni/ipam"}}
]}
JSON
  cat > "$c/config.toml" <<TOML
version = 2
root = "$c/root"
state = "$c/state"
[grpc]
  address = "$c/containerd.sock"
[ttrpc]
  address = "$c/containerd.sock.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "$c/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$NODE_IMAGE_PAUSE"
  restrict_oom_score_adj = true
  disable_apparmor = true
  enable_tls_streaming = false
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "$c/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$d/cni/net.d"
TOML
  # A loopback port nothing listens on: a pull that should never happen
  # fails at once, and no registry name is ever resolved.
  HTTP_PROXY=http://127.0.0.1:9 HTTPS_PROXY=http://127.0.0.1:9 NO_PROXY= \
    start_bg "$d/containerd.pid" "$d/containerd.log" containerd --config "$c/config.toml"
  wait_until 30 "containerd of $(basename "$d")" "$d/containerd.log" "$d/containerd.pid" \
    ctr --address "$c/containerd.sock" version
}

node_kubelet() {
  local d=$1 n=$2 server=$3
  local node ip port healthz
  node=$(cat "$d/node/name"); ip=$(cat "$d/node/ip")
  port=$(free_port); healthz=$(free_port)
  mkdir -p "$d/node/manifests" "$d/node/logs" "$d/kubelet"
  printf '# Pods of the test node resolve no names.\nnameserver 127.0.0.1\noptions timeout:1 attempts:1\n' > "$d/node/resolv.conf"
  cat > "$d/node/kubelet.kubeconfig" <<KC
apiVersion: v1
kind: Config
clusters:
- name: cluster
  cluster: {server: "$server", certificate-authority: "$d/pki/ca.crt"}
users:
- name: node
  user: {client-certificate: "$d/pki/kubelet-client.crt", client-key: "$d/pki/kubelet-client.key"}
contexts:
- name: node
  context: {cluster: cluster, user: node}
current-context: node
KC
  cat > "$d/node/kubelet.yaml" <<YAML
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: "$ip"
port: $port
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: $healthz
tlsCertFile: "$d/pki/kubelet-serving.crt"
tlsPrivateKeyFile: "$d/pki/kubelet-serving.key"
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: "$d/pki/ca.crt"}
authorization:
  mode: Webhook
containerRuntimeEndpoint: "unix://$d/containerd/containerd.sock"
cgroupDriver: cgroupfs
cgroupRoot: /ferry$n
failCgroupV1: false
failSwapOn: false
staticPodPath: "$d/node/manifests"
podLogsDir: "$d/node/logs"
volumePluginDir: "$d/node/volume-plugins"
resolvConf: "$d/node/resolv.conf"
clusterDomain: cluster.local
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: "1Mi", nodefs.available: "1%", nodefs.inodesFree: "1%", imagefs.available: "1%"}
serializeImagePulls: false
maxPods: 110
YAML
  echo "$healthz" > "$d/node/healthz-port"
  # The kubelet puts every Pod under /ferryN but wants that root to exist,
  # in every hierarchy; a new cpuset cgroup starts with no CPUs or memory
  # nodes, so it gets its parent's.
  local hierarchy
  for hierarchy in /sys/fs/cgroup/*/; do
    [[ -f $hierarchy/cgroup.procs ]] || continue
    mkdir -p "$hierarchy/ferry$n"
    if [[ -f $hierarchy/cpuset.cpus ]]; then
      cat "$hierarchy/cpuset.cpus" > "$hierarchy/ferry$n/cpuset.cpus"
      cat "$hierarchy/cpuset.mems" > "$hierarchy/ferry$n/cpuset.mems"
    fi
  done
  start_bg "$d/kubelet.pid" "$d/kubelet.log" "$bin/kubelet" --config "$d/node/kubelet.yaml" \
    --kubeconfig "$d/node/kubelet.kubeconfig" --root-dir "$d/kubelet" \
    --hostname-override "$node" --node-ip "$ip" --v 1
}

node_csi() {
  local d=$1 token=$2 server=$3
  local node socket
  node=$(cat "$d/node/name")
  socket="$d/kubelet/plugins/$CSI_DRIVER/csi.sock"
  write_kubeconfig "$d/csi.kubeconfig" "$(basename "$d")" "$server" "$d/pki/ca.crt" csi "$token"
  start_bg "$d/ferry-csi.pid" "$d/ferry-csi.log" "$bin/ferry-csi" --endpoint "$socket" \
    --registration-dir "$d/kubelet/plugins_registry" --state-dir "$d/csi-state" --node-id "$node"
  wait_until 20 "ferry-csi of $(basename "$d")" "$d/ferry-csi.log" "$d/ferry-csi.pid" test -S "$socket"
  start_bg "$d/csi-provisioner.pid" "$d/csi-provisioner.log" "$bin/csi-provisioner" --csi-address "$socket" \
    --kubeconfig "$d/csi.kubeconfig" --leader-election=false --timeout 60s
  start_bg "$d/csi-snapshotter.pid" "$d/csi-snapshotter.log" "$bin/csi-snapshotter" --csi-address "$socket" \
    --kubeconfig "$d/csi.kubeconfig" --leader-election=false --timeout 60s
  start_bg "$d/snapshot-controller.pid" "$d/snapshot-controller.log" "$bin/snapshot-controller" \
    --kubeconfig "$d/csi.kubeconfig" --leader-election=false
  # Changed-block tracking: the sidecar serves GetMetadataAllocated and
  # GetMetadataDelta over TLS on every address of the host (it has no bind
  # flag; the SnapshotMetadataService names the node's). It takes the
  # audience from the SnapshotMetadataService (no --audience), and its
  # health endpoint, on a loopback port of its own as several nodes run at
  # once, answers only once it has checked that the driver serves
  # SNAPSHOT_METADATA_SERVICE.
  local sms="$d/snapshot-metadata" health
  health=$(free_port)
  start_bg "$d/csi-snapshot-metadata.pid" "$d/csi-snapshot-metadata.log" "$bin/csi-snapshot-metadata" \
    --csi-address "$socket" --kubeconfig "$d/csi.kubeconfig" --port "$(cat "$sms/port")" \
    --tls-cert "$sms/server.crt" --tls-key "$sms/server.key" \
    --http-endpoint "127.0.0.1:$health" --disable-metrics
  wait_until 30 "csi-snapshot-metadata of $(basename "$d")" "$d/csi-snapshot-metadata.log" "$d/csi-snapshot-metadata.pid" \
    curl -sf "http://127.0.0.1:$health/health"
}

node_scheduler() {
  local d=$1 token=$2 server=$3 port
  port=$(free_port)
  write_kubeconfig "$d/scheduler.kubeconfig" "$(basename "$d")" "$server" "$d/pki/ca.crt" scheduler "$token"
  start_bg "$d/scheduler.pid" "$d/scheduler.log" "$bin/kube-scheduler" --kubeconfig "$d/scheduler.kubeconfig" \
    --authentication-kubeconfig "$d/scheduler.kubeconfig" --authorization-kubeconfig "$d/scheduler.kubeconfig" \
    --bind-address 127.0.0.1 --secure-port "$port" --leader-elect=false
}

# The node is settled when it is Ready without the not-ready taint and the
# kubelet has registered the CSI driver on it.
node_settled() {
  local d=$1 node
  node=$(cat "$d/node/name")
  api "$d" GET "/api/v1/nodes/$node" | python3 -c '
import json, sys
node = json.load(sys.stdin)
ready = any(c["type"] == "Ready" and c["status"] == "True" for c in node.get("status", {}).get("conditions", []))
tainted = any(t["key"] == "node.kubernetes.io/not-ready" for t in node.get("spec", {}).get("taints", []) or [])
sys.exit(0 if ready and not tainted else 1)' &&
    api "$d" GET "/apis/storage.k8s.io/v1/csinodes/$node" | grep -q "\"$CSI_DRIVER\""
}

# node_service_route DIR N add|delete: what kube-proxy would do for the one
# Service that matters here: Pods reach the API server at the 'kubernetes'
# Service's address (in-cluster configuration), translated on the node to
# the API server's address on the bridge. Nothing is forwarded.
node_service_route() {
  local d=$1 n=$2 action=$3 server
  server=$(cat "$d/server"); server=${server#https://}
  local rule=(PREROUTING -i "ferry$n" -d "$KUBERNETES_SERVICE_IP/32" -p tcp --dport 443
    -j DNAT --to-destination "$server" -m comment --comment "ferry-testenv $(basename "$d")")
  if [[ $action == add ]]; then
    iptables -w -t nat -A "${rule[@]}"
  else
    iptables -w -t nat -D "${rule[@]}" 2>/dev/null || true
  fi
}

# node_s3_route DIR add|delete: Pods reach the environment's MinIO, which
# listens on loopback, at the node's address and MinIO's port (a DNAT rule
# to 127.0.0.1, which the bridge accepts with route_localnet), so a Pod can
# write a repository as a mover Pod does.
node_s3_route() {
  local d=$1 action=$2 n ip endpoint port
  [[ -f $d/node/subnet && -f $STATE/minio/endpoint ]] || return 0
  n=$(cat "$d/node/subnet"); ip=$(cat "$d/node/ip")
  endpoint=$(cat "$STATE/minio/endpoint"); port=${endpoint##*:}
  local rule=(PREROUTING -i "ferry$n" -d "$ip/32" -p tcp --dport "$port"
    -j DNAT --to-destination "127.0.0.1:$port" -m comment --comment "ferry-testenv $(basename "$d") s3")
  if [[ $action == add ]]; then
    sysctl -qw "net.ipv4.conf.ferry$n.route_localnet=1"
    iptables -w -t nat -A "${rule[@]}"
    echo "http://$ip:$port" > "$d/node/s3-endpoint"
  else
    iptables -w -t nat -D "${rule[@]}" 2>/dev/null || true
  fi
}

# node_start DIR BIN SCHEDULER_TOKEN CSI_TOKEN FERRY_BINARY
node_start() {
  local d=$1 bin=$2 sched_token=$3 csi_token=$4 ferry=$5
  local n server
  n=$(cat "$d/node/subnet"); server=$(cat "$d/server")
  node_snapshot_metadata_pki "$d"
  node_cluster_objects "$d" "$bin/../crds"
  node_service_route "$d" "$n" add
  node_containerd "$d" "$n"
  node_images "$d" "$bin" "$ferry"
  node_scheduler "$d" "$sched_token" "$server"
  node_kubelet "$d" "$n" "$server"
  node_csi "$d" "$csi_token" "$server"
}

# node_stop DIR: stop the node and leave nothing of it behind: its
# processes (found by PID files and by their cgroups, not by name), the
# containers' network namespaces, every mount under DIR, the loop devices
# of its block volumes, its cgroups and its bridge.
node_stop() {
  local d=$1
  [[ -f $d/node/subnet ]] || return 0
  local n; n=$(cat "$d/node/subnet")
  # The Pods' network namespaces, named by the veths on the node's bridge
  # (this finds them even when their processes are already gone).
  local netns_names=()
  mapfile -t netns_names < <(ip -o link show master "ferry$n" 2>/dev/null | grep -o 'link-netns [^ ]*' | cut -d' ' -f2)
  local p
  for p in kubelet scheduler csi-provisioner csi-snapshotter snapshot-controller csi-snapshot-metadata ferry-csi; do
    stop_pidfile "$d/$p.pid"
  done
  # Every process of every Pod lives in a cgroup under /ferryN; note their
  # network namespaces, then kill them.
  local netns_inodes=() pid cg
  local cgroups=()
  mapfile -t cgroups < <(find /sys/fs/cgroup/*/"ferry$n" -depth -type d 2>/dev/null)
  local procs
  for cg in "${cgroups[@]}"; do
    # A cgroup can vanish while this runs (runc removes a killed
    # container's): read what is there, ignore what is gone.
    procs=$(cat "$cg/cgroup.procs" 2>/dev/null || true)
    for pid in $procs; do
      netns_inodes+=("$(stat -L -c %i "/proc/$pid/ns/net" 2>/dev/null || true)")
      kill -KILL "$pid" 2>/dev/null || true
    done
  done
  # A killed process leaves its cgroup once the kernel has reaped it
  # (cgroup.procs always reports size 0, so read it).
  local deadline=$((SECONDS + 10))
  for cg in "${cgroups[@]}"; do
    while [[ -n $(cat "$cg/cgroup.procs" 2>/dev/null || true) ]] && ((SECONDS < deadline)); do sleep 0.1; done
  done
  # The runc shims of this node's containerd, then containerd.
  local shims
  shims=$(pgrep -f "containerd-shim-runc-v2 .*-address $d/containerd/containerd.sock" || true)
  [[ -n $shims ]] && kill -KILL $shims 2>/dev/null || true
  stop_pidfile "$d/containerd.pid"
  local ns
  for ns in /run/netns/*; do
    [[ -e $ns ]] || continue
    local inode; inode=$(stat -L -c %i "$ns" 2>/dev/null || true)
    if { [[ -n $inode ]] && printf '%s\n' "${netns_inodes[@]}" | grep -qx "$inode"; } ||
      printf '%s\n' "${netns_names[@]}" | grep -qx "$(basename "$ns")"; then
      umount "$ns" 2>/dev/null || umount -l "$ns" 2>/dev/null || true
      rm -f "$ns"
    fi
  done
  # Mounts below the cluster's directory, deepest first.
  local mounts=()
  mapfile -t mounts < <(awk -v prefix="$d/" 'index($5, prefix) == 1 { print $5 }' /proc/self/mountinfo | awk '{ print length, $0 }' | sort -rn | cut -d' ' -f2-)
  local m
  for m in "${mounts[@]}"; do
    umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
  done
  local loop
  for loop in $(losetup --noheadings --output NAME,BACK-FILE 2>/dev/null | awk -v prefix="$d/" 'index($2, prefix) == 1 { print $1 }'); do
    losetup --detach "$loop" 2>/dev/null || true
  done
  # Empty cgroups, deepest first (the kernel refuses one with processes).
  for cg in "${cgroups[@]}"; do
    rmdir "$cg" 2>/dev/null || true
  done
  [[ -f $d/server ]] && node_service_route "$d" "$n" delete
  node_s3_route "$d" delete
  ip link delete "ferry$n" 2>/dev/null || true
  # The host ends of the Pods' veth pairs go with their namespaces.
  rm -f "$d/node/subnet"
}
