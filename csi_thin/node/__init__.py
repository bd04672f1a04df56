"""Stage/publish/stats/expand logic behind the CSI Node service, in domain terms (no protobuf)."""
