"""The pretrained networks around a DiT, loaded from local files: the Stable Diffusion VAE (images <-> latents) and
the T5 text encoder (prompts -> caption embeddings)."""
