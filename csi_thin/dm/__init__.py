"""Device-mapper only: the DM ioctl client, table/status parsing, loop devices, thin tools.

Knows nothing of gRPC or Kubernetes; the pool backends are its only callers.
"""
