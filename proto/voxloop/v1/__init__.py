"""voxloop.v1: the public gRPC contract (generated stubs live beside the .proto files)."""
