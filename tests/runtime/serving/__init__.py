"""Serving tests: HTTP, gRPC, batching, load, drain and the local main job."""
