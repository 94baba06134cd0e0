"""Small random Hugging Face models for the transformers drop-in tests (CPU and GPU)."""

import pytest


def tiny_gpt_oss(seed, head_dim=32):
    """A random two-layer gpt-oss (transformers' GptOss: GQA, sinks, a 8-token sliding window on
    layer 0, full causal on layer 1) in bfloat16, with sinks near the LSE of its rows so they
    take a real share of the softmax. head_dim 64 (gpt-oss's own) for the GPU paths, which take
    64 and 128."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.GptOssConfig(
        vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=head_dim, intermediate_size=64, num_local_experts=4,
        num_experts_per_tok=2, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"], max_position_embeddings=256)
    model = transformers.GptOssForCausalLM(cfg).to(torch.bfloat16).eval()
    for module in model.modules():
        if hasattr(module, "sinks"):
            torch.nn.init.normal_(module.sinks, mean=2.0, std=1.0)
    return model


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())
