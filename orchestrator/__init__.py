"""The thin serving side: the embedded Triton launcher, and (later) the API and diffusion loop."""
