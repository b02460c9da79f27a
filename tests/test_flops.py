"""FLOP counts against closed-form figures (within 1 %), on meta tensors unless stated."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from llmtop.agent.flops import counting as F  # noqa: E402
from llmtop.agent.flops import op_formulas as OF  # noqa: E402

L = 128  # sequence length of the reference figures


def close(x: float, ref: float, rel: float = 0.01) -> bool:
    return abs(x - ref) <= rel * abs(ref)


def _meta(cls, cfg, impl: str):
    cfg._attn_implementation = impl
    with torch.device("meta"):
        model = cls(cfg)
    return model.eval()


def _ids(batch: int = 1, seq: int = L):
    return torch.zeros(batch, seq, dtype=torch.long, device="meta")


def _module(prof: F.Profile, path: str) -> F.ModuleCost:
    return next(m for m in prof.modules if m.path == path)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_bert_base_matches_published_figures(impl: str) -> None:
    prof = F.count(_meta(transformers.BertModel, transformers.BertConfig(), impl), (_ids(),))
    assert close(prof.flops, 22.35e9)
    linear = sum(o.flops for o in prof.ops if o.name == "aten::addmm")
    assert close(linear, 21.74e9)  # 2 x 85 M x 128
    for i in range(12):  # 1.862 GFLOPs per layer with its two attention matmuls
        assert close(_module(prof, f"encoder.layer.{i}").flops, 1.862e9)
    assert prof.macs == prof.flops / 2


def test_gpt2_with_lm_head_eager_counts_the_full_square() -> None:
    prof = F.count(_meta(transformers.GPT2LMHeadModel, transformers.GPT2Config(), "eager"), (_ids(),))
    assert close(prof.flops, 32.23e9)
    assert close(_module(prof, "transformer").flops, 22.35e9)
    assert close(_module(prof, "lm_head").flops, 9.88e9)
    assert prof.flops > 1e10  # the seed printed 0.031 GFLOPs


def test_gpt2_sdpa_causal_counts_the_computed_triangle() -> None:
    eager = F.count(_meta(transformers.GPT2LMHeadModel, transformers.GPT2Config(), "eager"), (_ids(),))
    sdpa = F.count(_meta(transformers.GPT2LMHeadModel, transformers.GPT2Config(), "sdpa"), (_ids(),))
    heads, hd, layers = 12, 64, 12
    skipped = layers * 2 * 2 * heads * hd * (L * L - L * (L + 1) // 2)  # QK^T and PV above the diagonal
    assert sdpa.flops == pytest.approx(eager.flops - skipped, rel=1e-9)
    attn = [o for o in sdpa.ops if o.name == "aten::scaled_dot_product_attention"]
    assert sum(o.calls for o in attn) == layers
    assert sum(o.flops for o in attn) == pytest.approx(layers * 4 * heads * hd * L * (L + 1) // 2)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_llama_block_with_grouped_query_attention(impl: str) -> None:
    h, heads, kv, inter, vocab, seq = 256, 8, 2, 688, 1000, 64
    cfg = transformers.LlamaConfig(hidden_size=h, num_attention_heads=heads, num_key_value_heads=kv,
                                   intermediate_size=inter, num_hidden_layers=1, vocab_size=vocab)
    prof = F.count(_meta(transformers.LlamaForCausalLM, cfg, impl), (_ids(seq=seq),), {"use_cache": False})
    hd = h // heads
    proj = 2 * seq * h * (h + 2 * kv * hd + h)  # q, k, v (kv heads only), o
    mlp = 3 * 2 * seq * h * inter
    pairs = seq * (seq + 1) // 2 if impl == "sdpa" else seq * seq  # causal sdpa skips the masked half
    attn = 2 * 2 * heads * hd * pairs  # every query head does its QK^T and PV
    head = 2 * seq * h * vocab
    assert close(_module(prof, "model.layers.0").flops, proj + mlp + attn)
    assert close(prof.flops, proj + mlp + attn + head)
    # GQA moves less: k/v projections are a quarter of q's
    k_proj = _module(prof, "model.layers.0.self_attn.k_proj")
    q_proj = _module(prof, "model.layers.0.self_attn.q_proj")
    assert k_proj.flops * heads == q_proj.flops * kv


def test_t5_small_encoder_decoder() -> None:
    cfg = transformers.T5Config(d_model=512, d_ff=2048, d_kv=64, num_heads=8, num_layers=6,
                                num_decoder_layers=6, vocab_size=32128, feed_forward_proj="relu")
    with torch.device("meta"):
        model = transformers.T5ForConditionalGeneration(cfg).eval()
    le, ld, d, inner, ff, heads, dkv, v = 128, 32, 512, 512, 2048, 8, 64, 32128
    prof = F.count(model, (), {"input_ids": _ids(seq=le), "decoder_input_ids": _ids(seq=ld),
                               "use_cache": False})
    enc_layer = 4 * 2 * le * d * inner + 2 * 2 * heads * le * le * dkv + 2 * 2 * le * d * ff
    dec_self = 4 * 2 * ld * d * inner + 2 * 2 * heads * ld * ld * dkv
    dec_cross = 2 * 2 * ld * d * inner + 2 * 2 * le * d * inner + 2 * 2 * heads * ld * le * dkv
    dec_layer = dec_self + dec_cross + 2 * 2 * ld * d * ff
    head = 2 * ld * d * v
    assert close(_module(prof, "encoder").flops, 6 * enc_layer)
    assert close(_module(prof, "decoder").flops, 6 * dec_layer)
    assert close(prof.flops, 6 * enc_layer + 6 * dec_layer + head)


def test_macs_are_half_the_flops_of_a_matmul() -> None:
    lin = torch.nn.Linear(64, 32, bias=False)
    prof = F.count(lin, (torch.randn(8, 64),))  # real CPU tensors work too
    (op,) = [o for o in prof.ops if o.flops]
    assert op.flops == 2 * 8 * 64 * 32
    assert prof.macs == 8 * 64 * 32
    assert op.bytes == 4 * (8 * 64 + 64 * 32 + 8 * 32)  # input + weight read, output written


def test_sdpa_on_cpu_is_counted_and_causal_halves_it() -> None:
    q = torch.randn(2, 4, 16, 8)
    k = torch.randn(2, 2, 16, 8)

    class Attn(torch.nn.Module):
        def forward(self, q, k, causal):
            return torch.nn.functional.scaled_dot_product_attention(q, k, k, is_causal=causal,
                                                                    enable_gqa=True)

    full = F.count(Attn(), (q, k, False))
    causal = F.count(Attn(), (q, k, True))
    assert full.flops == 2 * 2 * 2 * 4 * 16 * 16 * 8
    assert causal.flops == 2 * 2 * 2 * 4 * (16 * 17 // 2) * 8
    # the aten-level formula (used for profiler rows) agrees with the function-level count
    shapes = [list(q.shape), list(k.shape), list(k.shape)]
    name = "aten::_scaled_dot_product_flash_attention_for_cpu"
    assert OF.op_flops(name, shapes, [None, None, None, 0.0, True]) == causal.flops
    assert OF.op_flops(name, shapes, [None, None, None, 0.0, False]) == full.flops


def test_embedding_is_zero_flops_but_moves_its_rows() -> None:
    emb = torch.nn.Embedding(1000, 16)
    prof = F.count(emb, (torch.zeros(2, 5, dtype=torch.long),))
    (op,) = [o for o in prof.ops if o.name == "aten::embedding"]
    assert op.flops == 0 and op.counted
    assert op.bytes == 2 * 5 * 8 + 2 * (2 * 5 * 16 * 4)  # indices, rows read, output written


def test_causal_pairs() -> None:
    assert OF.causal_pairs(4, 4) == 10
    assert OF.causal_pairs(1, 4) == 1  # top-left aligned, as torch's is_causal
    assert OF.causal_pairs(6, 4) == 10 + 2 * 4


def test_memory_figures_on_meta() -> None:
    model = _meta(transformers.GPT2LMHeadModel, transformers.GPT2Config(n_layer=2), "sdpa")
    prof = F.count(model, (_ids(),))
    assert prof.weight_bytes == 4 * sum(p.numel() for p in model.parameters()) + 4 * sum(
        b.numel() for b in model.buffers())
    logits = L * 50257 * 4
    assert prof.act_peak_bytes >= logits  # the logits are alive at the end
    assert prof.act_written_bytes >= prof.act_peak_bytes
    assert prof.peak_bytes == prof.weight_bytes + prof.input_bytes + prof.act_peak_bytes


def test_gpu_kernel_rows_use_their_layout_and_mask_conventions() -> None:
    # profiler rows of the CUDA kernels take (B, L, H, D); the same attention gives the same FLOPs
    bhld = [[2, 4, 16, 8], [2, 2, 16, 8], [2, 2, 16, 8]]
    blhd = [[2, 16, 4, 8], [2, 16, 2, 8], [2, 16, 2, 8]]
    causal = OF.op_flops("aten::_scaled_dot_product_flash_attention", bhld, [None] * 3 + [0.0, True])
    assert OF.op_flops("aten::_flash_attention_forward", blhd, [None] * 8 + [True]) == causal
    assert OF.op_flops("aten::_efficient_attention_forward", blhd, [None] * 9 + [1]) == causal
    full = OF.op_flops("aten::_efficient_attention_forward", blhd, [None] * 9 + [0])
    assert full == 2 * 2 * 2 * 4 * 16 * 16 * 8 > causal
    # the math fallback multiplies the whole square even when causal
    assert OF.op_flops("aten::_scaled_dot_product_attention_math", bhld, [None] * 5 + [True]) == full
    # composites whose child kernel carries the work get none in a profiler trace
    assert "aten::_scaled_dot_product_flash_attention" in OF.PARENT_OPS
    assert "aten::linear" in OF.PARENT_OPS and "aten::addmm" not in OF.PARENT_OPS


def test_bottom_right_causal_pairs_for_a_kv_cache() -> None:
    assert OF.causal_pairs(1, 4, bottom_right=True) == 4  # one new token sees the whole cache
    assert OF.causal_pairs(2, 6, bottom_right=True) == 5 + 6
    assert OF.causal_pairs(4, 4, bottom_right=True) == OF.causal_pairs(4, 4)


def test_fused_attention_backward_counts_the_recomputed_scores() -> None:
    q = [2, 4, 16, 8]
    kv = [2, 2, 16, 8]
    grad = [None] * 8
    full = OF.op_flops("aten::_scaled_dot_product_flash_attention_for_cpu_backward", [q, q, kv, kv],
                      grad[:7] + [False])
    causal = OF.op_flops("aten::_scaled_dot_product_flash_attention_for_cpu_backward", [q, q, kv, kv],
                        grad[:7] + [True])
    forward = 2 * 2 * 2 * 4 * 16 * 16 * 8
    assert full == forward * 5 / 2  # dV, dP, dQ, dK and QK^T again: 5 matmuls for the forward's 2
    assert causal == full * (16 * 17 // 2) / (16 * 16)
    blhd = [[2, 16, 4, 8], [2, 16, 4, 8], [2, 16, 2, 8], [2, 16, 2, 8]]
    assert OF.op_flops("aten::_flash_attention_backward", blhd, [None] * 11 + [True]) == causal
    assert OF.op_flops("aten::_efficient_attention_backward", blhd, [None] * 14 + [1]) == causal
