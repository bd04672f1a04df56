"""The gRPC edge: validation, servicers, interceptors; the generated CSI stubs live in pb/."""
