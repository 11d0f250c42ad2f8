"""The gRPC server: servicers, the model worker, auth, metrics."""
