"""The containerd proxy snapshotter's semantics (service), its filter syntax (filters) and its
generated stubs (pb); the gRPC edge is csi_thin.csi.snapshots, the pool transactions csi_thin.pool.layers."""
