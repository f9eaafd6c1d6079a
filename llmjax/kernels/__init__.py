"""Pallas attention kernels (GPU and TPU) with XLA references; see docs/kernels.md."""

from llmjax.kernels.decode import decode_attention
from llmjax.kernels.flash import BlockSizes, flash_attention
from llmjax.kernels.reference import attention_reference, decode_reference

__all__ = [
    "BlockSizes",
    "attention_reference",
    "decode_attention",
    "decode_reference",
    "flash_attention",
]
