"""The diffusion parts every method shares: schedule, inversion, sampling, attention, features, LoRA."""
