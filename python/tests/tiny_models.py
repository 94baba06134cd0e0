"""Small random Hugging Face models for the transformers drop-in tests (CPU and GPU)."""

import pytest


def _tiny(config, model, seed, head_dim, **extra):
    """A random two-layer decoder of transformers' `config` / `model` classes in bfloat16, the
    shape every tiny model here shares: GQA (4 query heads, 2 K/V heads), a 8-token sliding
    window on layer 0, full causal on layer 1; `extra` the family's own config fields."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = getattr(transformers, config)(
        vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=head_dim, intermediate_size=64, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"], max_position_embeddings=256, **extra)
    return getattr(transformers, model)(cfg).to(torch.bfloat16).eval()


def tiny_gpt_oss(seed, head_dim=32):
    """A random two-layer gpt-oss (transformers' GptOss: sinks, the window on layer 0) in
    bfloat16, with sinks near the LSE of its rows so they take a real share of the softmax.
    head_dim 64 (gpt-oss's own) for the GPU paths, which take 64 and 128."""
    torch = pytest.importorskip("torch")
    model = _tiny("GptOssConfig", "GptOssForCausalLM", seed, head_dim, num_local_experts=4,
                  num_experts_per_tok=2)
    for module in model.modules():
        if hasattr(module, "sinks"):
            torch.nn.init.normal_(module.sinks, mean=2.0, std=1.0)
    return model


def tiny_gemma2(seed, head_dim=32, softcap=2.0):
    """A random two-layer Gemma 2 (transformers' Gemma2: attention logit soft-capping, the window
    on layer 0) in bfloat16. Its q / k projections are scaled up so the scores reach the cap
    (random init leaves them near 0), and the cap is lowered from Gemma 2's 50 to `softcap` for
    the same reason."""
    torch = pytest.importorskip("torch")
    model = _tiny("Gemma2Config", "Gemma2ForCausalLM", seed, head_dim, attn_logit_softcapping=softcap,
                  final_logit_softcapping=None, query_pre_attn_scalar=head_dim)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                param.mul_(12.0)
    return model


def against_float32(make, seed, ids_seed, device="cpu", tol=3e-2, **kw):
    """make(seed, **kw) in bfloat16 running attn_implementation=intfa.register_transformers(),
    the same model in float32 with eager attention, both on `device`, and a (2, 40) batch of
    tokens: (model, ref, ids, err), err the relative error of the model's logits against ref's,
    asserted below tol (INT8 error)."""
    torch = pytest.importorskip("torch")
    import intfa
    model, ref = make(seed, **kw).to(device), make(seed, **kw).float().to(device)
    ref.set_attn_implementation("eager")
    model.set_attn_implementation(intfa.register_transformers())
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(ids_seed)).to(device)
    with torch.no_grad():
        err = rel(model(ids).logits, ref(ids).logits)
    assert err < tol
    return model, ref, ids, err


def error_without(model, ref, ids, drop):
    """The relative error against ref's logits of the model on intfa with the attention call's
    keyword `drop` (s_aux, sliding_window, softcap) passed as None; the model is left on intfa."""
    torch = pytest.importorskip("torch")
    import intfa
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask
    AttentionMaskInterface.register("intfa_without", flash_attention_mask)
    AttentionInterface.register(
        "intfa_without", lambda *a, **kw: intfa.transformers_attention(*a, **{**kw, drop: None}))
    model.set_attn_implementation("intfa_without")
    with torch.no_grad():
        err = rel(model(ids).logits, ref(ids).logits)
    model.set_attn_implementation(intfa.register_transformers())
    return err


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def check_greedy_steps(model, ref, prompt, steps=5, tol=3e-2):
    """model generates greedily from prompt [1, n] with its cache (decode steps); each step's
    logits are within tol of ref's (the float32 model) on the same prefix."""
    torch = pytest.importorskip("torch")
    n = prompt.shape[1]
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=steps, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
        teacher = ref(out.sequences).logits[0, n - 1:n - 1 + steps]
    for step, x in enumerate(out.logits):
        assert rel(x[0], teacher[step]) < tol, step


def left_padded(prompts, width):
    """The prompts (1-D token tensors) left-padded with 0 to width: (batch, 2D attention mask)."""
    torch = pytest.importorskip("torch")
    batch = torch.stack([torch.cat([p.new_zeros(width - len(p)), p]) for p in prompts])
    cols = torch.arange(width, device=batch.device)
    return batch, torch.stack([cols >= width - len(p) for p in prompts]).long()


def check_packed_prompts(model, prompts, tol=1e-2):
    """The prompts (1-D token tensors) packed padding-free into one row, with position_ids
    restarting at 0 per prompt (transformers' DataCollatorWithFlattening): each prompt's logits
    within tol of the prompt run alone, and not those of the row read as one sequence."""
    torch = pytest.importorskip("torch")
    row = torch.cat(prompts)[None]
    pos = torch.cat([torch.arange(len(p), device=row.device) for p in prompts])[None]
    with torch.no_grad():
        packed = model(row, position_ids=pos).logits[0]
        lo = 0
        for i, p in enumerate(prompts):
            alone = model(p[None]).logits[0]
            assert rel(packed[lo:lo + len(p)], alone) < tol, i
            lo += len(p)
        assert rel(model(row).logits[0, len(prompts[0]):], packed[len(prompts[0]):]) > 5 * tol
