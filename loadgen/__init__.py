"""Load generator: open and closed loop gRPC load against a live server."""
