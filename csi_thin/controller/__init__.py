"""Provisioning logic behind the CSI Controller service, in domain terms (no protobuf, no gRPC).

The `csi` layer validates requests into the values defined here and translates the results back.
"""
