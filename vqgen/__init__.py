"""vqgen: hierarchical VQ-VAE-2 with gated PixelCNN priors.

``from vqgen import VQGen``: a trained generator (:mod:`vqgen.generate`).
"""

__all__ = ["VQGen"]


def __getattr__(name: str):
    # Imported on first use: `import vqgen` (and so `vqgen --help`) should not pull in torch.
    if name == "VQGen":
        from vqgen.generate import VQGen

        return VQGen
    raise AttributeError(f"module 'vqgen' has no attribute {name!r}")
