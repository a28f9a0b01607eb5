"""What is on disk: the diffusers layout of FLUX.2 [dev], its verification, and the tiny offline model."""
