"""DeepSeek-V2/V3 multi-head latent attention (MLA): low-rank q and kv projections around whole heads.

``q_a_proj`` (hidden -> q_lora_rank) and ``kv_a_proj_with_mqa`` (hidden -> kv_lora_rank + rope dims) compress;
``q_b_proj`` and ``kv_b_proj`` expand the latents into heads of ``qk_nope_head_dim + qk_rope_head_dim`` and
``qk_nope_head_dim + v_head_dim`` channels, viewed as (-1, head size); ``o_proj`` reads heads x
``v_head_dim``. The forward splits the kv latent with ``self.kv_lora_rank`` and views it with the same
attribute, so both ranks are followed: the graph may narrow them, and this adapter rewrites them.
"""
from __future__ import annotations

from torch import nn

from ...hf.attention import is_mla_attention
from ..core import MODULE, adapter
from ..layout import in_width, out_width
from .attention import ATTENTION


@adapter("Hugging Face multi-head latent attention (num_heads, q_lora_rank, kv_lora_rank)", is_mla_attention,
         order=MODULE + 30, claim=ATTENTION, follows=("num_heads", "q_lora_rank", "kv_lora_rank"))
def mla_attention(module: nn.Module) -> None:
    heads = in_width(module.o_proj) // module.v_head_dim
    module.num_heads = heads
    module.kv_lora_rank = out_width(module.kv_a_proj_with_mqa) - module.qk_rope_head_dim
    if getattr(module, "q_a_proj", None) is not None:
        module.q_lora_rank = out_width(module.q_a_proj)
    if hasattr(module, "hidden_size"):
        module.hidden_size = out_width(module.o_proj)
