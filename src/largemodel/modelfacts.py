"""Facts of a Llama-family decoder computed from its shapes alone (no torch): shared by the planner,
`largemodel inspect` and the runtime."""

from __future__ import annotations


def parameter_count(*, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, head_dim: int,
                    vocab: int, tied: bool, qkv_bias: bool = False, o_bias: bool = False,
                    mlp_bias: bool = False) -> int:
    """Parameters of the decoder: embeddings, every layer's attention, MLP and two norms, the final
    norm, and the LM head unless it is tied to the embedding (then counted once)."""
    q_out, kv_out = heads * head_dim, kv_heads * head_dim
    attention = hidden * q_out + 2 * hidden * kv_out + q_out * hidden
    attention += (q_out + 2 * kv_out if qkv_bias else 0) + (hidden if o_bias else 0)
    mlp = 3 * hidden * intermediate + (2 * intermediate + hidden if mlp_bias else 0)
    per_layer = attention + mlp + 2 * hidden
    embedding = vocab * hidden
    return embedding + layers * per_layer + hidden + (0 if tied else vocab * hidden)
