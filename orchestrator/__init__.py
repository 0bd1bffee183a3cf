"""The thin service: the denoising loop as a library (pipeline/), the engine (jobs, the step batcher), security,
metrics, and the HTTP API (server/). It holds no weights: Triton runs every model."""
