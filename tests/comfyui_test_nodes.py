"""Test-only ComfyUI node (linked into the test server's custom_nodes, never shipped).

FLUX conditioning needs CLIP-L + T5-XXL, far too large for tests; this node makes
seeded random conditioning of FLUX's shapes instead.
"""

import torch


class TernaryTestConditioning:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "seed": ("INT", {"default": 0, "min": 0, "max": 2**31}),
                "tokens": ("INT", {"default": 8, "min": 1, "max": 512}),
            }
        }

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"
    CATEGORY = "testing"

    def make(self, seed, tokens):
        gen = torch.Generator().manual_seed(seed)
        cond = torch.randn(1, tokens, 4096, generator=gen)
        pooled = torch.randn(1, 768, generator=gen)
        return ([[cond, {"pooled_output": pooled}]],)


NODE_CLASS_MAPPINGS = {"TernaryTestConditioning": TernaryTestConditioning}
