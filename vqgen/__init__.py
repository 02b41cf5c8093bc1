"""vqgen: hierarchical VQ-VAE-2 with gated PixelCNN priors."""
