// Pinned Prometheus Operator CRDs (example/prometheus-operator-crd of its module): `tools/build.sh
// monitoring-crds` copies the ServiceMonitor and PrometheusRule CRDs into bin/crds/monitoring/ so the
// chart's monitoring objects are applied to a real API server in tests. No Go code is built.
module csi-thin.io/tools/monitoring-crds

go 1.26.0

require github.com/prometheus-operator/prometheus-operator v0.85.0
