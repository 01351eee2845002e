"""Shared machinery of the diffusion methods (StableSR, OSEDiff, SUPIR, InvSR, PromptSR), on diffusers.

bases      the SD bases and their component configs (offline single-file loading)
loading    bases from diffusers folders or original-layout files; method checkpoints
weights    the files each method needs and where users get them
tiny       tiny random-weight bases for tests, as diffusers folders and single files
runtime    runtime/tiling option sets, Runtime, NoiseSource
latents    image <-> latent with posterior sampling and optional tiled VAE

Needs the optional extra: pip install 'diffsr[diffusion]'.
"""
