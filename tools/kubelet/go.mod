// The kubelet module: source of pluginregistration.v1's api.proto, from which scripts/gen-proto.sh
// generates the Python stubs of kubelet plugin registration (no Go code is built from it).
module csi-thin.io/tools/kubelet

go 1.26.0

require k8s.io/kubelet v0.36.3
