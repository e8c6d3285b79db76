"""Test-only ComfyUI nodes (linked into the test server's custom_nodes, never shipped).

Real conditioning needs the families' text encoders (CLIP-L + T5-XXL, Mistral-3 24B...),
far too large for tests: TernaryTestConditioning makes seeded random conditioning of a
family's shapes instead (text width ``channels``, a pooled vector of ``pooled`` or none),
and TernaryTestLatent a seeded random latent (a reference image for Kontext / FLUX.2).
"""

import torch


class TernaryTestConditioning:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "seed": ("INT", {"default": 0, "min": 0, "max": 2**31}),
                "tokens": ("INT", {"default": 8, "min": 1, "max": 512}),
            },
            "optional": {
                "channels": ("INT", {"default": 4096, "min": 1, "max": 65536}),
                "pooled": ("INT", {"default": 768, "min": 0, "max": 65536}),
            },
        }

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"
    CATEGORY = "testing"

    def make(self, seed, tokens, channels=4096, pooled=768):
        gen = torch.Generator().manual_seed(seed)
        cond = torch.randn(1, tokens, channels, generator=gen)
        extras = {"pooled_output": torch.randn(1, pooled, generator=gen)} if pooled else {}
        return ([[cond, extras]],)


class TernaryTestLatent:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "seed": ("INT", {"default": 0, "min": 0, "max": 2**31}),
                "channels": ("INT", {"default": 16, "min": 1, "max": 256}),
                "height": ("INT", {"default": 8, "min": 1, "max": 256}),
                "width": ("INT", {"default": 8, "min": 1, "max": 256}),
            }
        }

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "make"
    CATEGORY = "testing"

    def make(self, seed, channels, height, width):
        gen = torch.Generator().manual_seed(seed)
        return ({"samples": torch.randn(1, channels, height, width, generator=gen)},)


NODE_CLASS_MAPPINGS = {
    "TernaryTestConditioning": TernaryTestConditioning,
    "TernaryTestLatent": TernaryTestLatent,
}
