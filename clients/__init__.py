"""Clients of the served models (tritonclient over gRPC/HTTP) and the `kiln` command line."""
