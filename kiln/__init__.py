"""kiln's torch-free core: what the build, the service, the Triton models and the clients share.

Nothing here imports another package of this project (import contracts in pyproject.toml check
it), and nothing here imports torch: the Triton models and a serving install load it without one.
"""
