"""The Triton GPT against an independent implementation, HF transformers' GPT2LMHeadModel."""
import pytest
import torch

from ftlab.convert.huggingface import config_from_hf, convert_hf, hf_to_ft_tensors
from ftlab.generate import generate
from ftlab.kernels import attention as attention_module
from ftlab.model import GPT, pack_prompts
from ftlab.reference import ReferenceGPT, reference_greedy
from tests.util import assert_rel_close

transformers = pytest.importorskip("transformers")

# small configs with awkward sizes: head sizes 6, 8 and 32, vocabularies that are not multiples of anything
CONFIGS = [
    dict(n_embd=24, n_head=4, n_layer=2, vocab_size=53),
    dict(n_embd=40, n_head=5, n_layer=1, vocab_size=101),
    dict(n_embd=64, n_head=2, n_layer=3, vocab_size=67, n_inner=72),
]
PROMPT_LENGTHS = [1, 7, 13]


def random_hf_model(n_positions=48, seed=0, **kwargs):
    torch.manual_seed(seed)
    vocab = kwargs["vocab_size"]
    config = transformers.GPT2Config(n_positions=n_positions, bos_token_id=vocab - 1, eos_token_id=vocab - 1,
                                     **kwargs)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # HF initialises biases to 0 and LayerNorms to 1: perturb everything so every term counts
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def ftlab_model(hf, dtype, device):
    config = config_from_hf(hf.config.to_dict())
    return GPT.from_ft_tensors(config, hf_to_ft_tensors(
        {k.removeprefix("transformer."): v for k, v in hf.state_dict().items()}, config), dtype=dtype, device=device)


def random_prompts(vocab, lengths):
    return [torch.randint(0, vocab - 1, (n,)).tolist() for n in lengths]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"H{c['n_embd']}-nh{c['n_head']}-L{c['n_layer']}")
def test_logits_equal_hf_fp32(cfg, device):
    hf = random_hf_model(**cfg)
    model = ftlab_model(hf, "fp32", device)
    prompts = random_prompts(cfg["vocab_size"], PROMPT_LENGTHS)
    ours = model.logits(prompts)
    for prompt, got in zip(prompts, ours):
        with torch.no_grad():
            ref = hf(torch.tensor([prompt])).logits[0]
        assert_rel_close(got.cpu(), ref, tol=1e-4, what=f"logits of a {len(prompt)}-token prompt")


@pytest.mark.parametrize("lengths", [[1, 2], [5, 1, 12], [13, 7, 1, 9]], ids=["gemv-path", "3-prompts", "4-prompts"])
@pytest.mark.parametrize("dtype, tol", [("fp32", 1e-5), pytest.param("fp16", 5e-3, marks=pytest.mark.gpu),
                                        pytest.param("bf16", 3e-2, marks=pytest.mark.gpu)])
@pytest.mark.parametrize("last_rows_grid", [None, 0], ids=["default", "last-rows-attention"])
def test_prefill_of_last_tokens_only(lengths, dtype, tol, last_rows_grid, device, monkeypatch):
    """prefill() carries only each prompt's last token past the last block's attention: the same logits as the
    full forward's rows at those tokens, and the same KV cache (every key and value written). last_rows_grid 0:
    the last block's attention computes the last rows alone at any grid size (context_attention's
    last_rows_only, which these small grids would not take)."""
    if last_rows_grid is not None:
        monkeypatch.setattr(attention_module, "LAST_ROWS_MIN_PROGRAMS", last_rows_grid)
    cfg = CONFIGS[2]
    model = ftlab_model(random_hf_model(**cfg), dtype, device)
    prompts = random_prompts(cfg["vocab_size"], lengths)
    batch = pack_prompts(prompts, model.device)
    caches = [model.new_kv_cache(len(prompts), batch.max_seqlen) for _ in range(2)]
    # rows beyond each prompt are never written: make them equal in both caches, and not zero
    caches[0].k.copy_(torch.randn_like(caches[0].k)), caches[0].v.copy_(torch.randn_like(caches[0].v))
    caches[1].k.copy_(caches[0].k), caches[1].v.copy_(caches[0].v)
    args = (batch.token_ids, batch.positions, batch.cu_seqlens, batch.max_seqlen)
    last = model.prefill(*args, caches[0])
    full = model.prefill(*args, caches[1], all_logits=True)
    assert last.shape == (len(prompts), cfg["vocab_size"])
    assert_rel_close(last.float().cpu(), full[batch.cu_seqlens[1:].long() - 1].float().cpu(), tol=tol,
                     what=f"{dtype} last-token logits, pruned vs full prefill")
    assert torch.equal(caches[0].k, caches[1].k) and torch.equal(caches[0].v, caches[1].v)


@pytest.mark.parametrize("lengths", [[30, 1, 40], pytest.param([3, 9, 1, 6, 2, 11] * 3, marks=pytest.mark.gpu)],
                         ids=["gemv-tail", "skinny-tail"])
@pytest.mark.parametrize("dtype, tol", [("fp32", 1e-5), pytest.param("fp16", 5e-3, marks=pytest.mark.gpu),
                                        pytest.param("bf16", 3e-2, marks=pytest.mark.gpu)])
def test_prefill_tail_off_cublas_matches_cublas_tail(lengths, dtype, tol, device, monkeypatch):
    """The prefill's last block after attention on its kept rows (one per prompt) through the decode block's GEMMs
    (GEMVs up to 4 rows, skinny GEMMs above on a GPU): the same last-token logits as the cuBLAS path
    (FTLAB_PREFILL_TAIL=0), whose residual stream leaves the biases out until the end."""
    if len(lengths) > 4 and dtype == "fp32":
        pytest.skip("skinny GEMMs take fp16 / bf16 only: an fp32 tail of more than 4 rows stays on cuBLAS")
    cfg = CONFIGS[2]
    model = ftlab_model(random_hf_model(n_positions=64, **cfg), dtype, device)
    prompts = random_prompts(cfg["vocab_size"], lengths)
    batch = pack_prompts(prompts, model.device)
    # more than 64 tokens: the prefill's blocks run on cuBLAS; the kept rows (one per prompt) can leave it
    assert model._uses_cublas(batch.token_ids.shape[0]) and model._tail_off_cublas(len(prompts))
    args = (batch.token_ids, batch.positions, batch.cu_seqlens, batch.max_seqlen)
    tail = model.prefill(*args, model.new_kv_cache(len(prompts), batch.max_seqlen))
    monkeypatch.setenv("FTLAB_PREFILL_TAIL", "0")
    assert not model._tail_off_cublas(len(prompts))
    cublas = model.prefill(*args, model.new_kv_cache(len(prompts), batch.max_seqlen))
    assert_rel_close(tail.float().cpu(), cublas.float().cpu(), tol=tol,
                     what=f"{dtype} last-token logits, decode-GEMM tail vs cuBLAS tail")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, tol", [("fp16", 5e-3), ("bf16", 3e-2)])
def test_logits_close_to_hf_half_precision(dtype, tol, device):
    cfg = dict(n_embd=256, n_head=4, n_layer=4, vocab_size=1031)
    hf = random_hf_model(n_positions=1024, **cfg)
    model = ftlab_model(hf, dtype, device)
    prompts = random_prompts(cfg["vocab_size"], [1, 77, 300, 513])
    for prompt, got in zip(prompts, model.logits(prompts)):
        with torch.no_grad():
            ref = hf(torch.tensor([prompt])).logits[0]
        assert_rel_close(got.float().cpu(), ref, tol=tol, what=f"{dtype} logits, prompt of {len(prompt)}")


def hf_greedy(hf, prompt, max_new_tokens):
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=hf.config.eos_token_id,
                          eos_token_id=hf.config.eos_token_id)
    return out[0].tolist()


def assert_decode_follows_hf(hf, result, tol, what):
    """Each generated token of a greedy `result` is HF's argmax on the same prefix, or within the logits' tolerance
    of it (tol relative to the largest |logit|, as assert_rel_close; x2 for a log-softmax): a half-precision path
    may break a near-tie the other way, a wrong one does not stay that close. Its log-probs equal HF's as closely."""
    for b, ids in enumerate(result.output_ids):
        with torch.no_grad():
            logits = hf(torch.tensor([ids])).logits[0].double()  # (len, V): row t predicts ids[t + 1]
        allowed = 2 * tol * logits.abs().max().item()
        ref = torch.log_softmax(logits, -1)
        start = result.input_length[b]
        for j, (tok, lp) in enumerate(zip(ids[start:], result.output_log_probs[b])):
            row = ref[start - 1 + j]
            assert row[tok] >= row.max() - allowed, f"{what}: sequence {b} step {j} took {tok}, HF's argmax " \
                f"{row.argmax().item()} is {row.max() - row[tok]:.3g} above it (allowed {allowed:.3g})"
            assert abs(lp - row[tok].item()) <= allowed, f"{what}: sequence {b} step {j} log-prob {lp:.4f} vs " \
                f"HF {row[tok].item():.4f}"


# 3 sequences decode through the fused GEMV path, 7 through cuBLAS GEMMs with LayerNorm+residual kernels (both
# prefill through the latter)
@pytest.mark.parametrize("i_g,lengths", [(1, [5, 1, 12]), (2, [5, 1, 12]), (1, [5, 1, 12, 3, 9, 2, 7])])
def test_greedy_ragged_batch_equals_hf_after_conversion(tmp_path, i_g, lengths, device):
    hf = random_hf_model(**CONFIGS[0])
    hf.save_pretrained(tmp_path / "hf")
    out_dir = convert_hf(tmp_path / "hf", tmp_path / "ft", infer_gpu_num=i_g, progress=False)
    model = GPT.from_cmodel(out_dir, dtype="fp32", device=device)
    prompts = random_prompts(53, lengths)
    assert model._uses_cublas(len(prompts)) == (len(prompts) > 4)
    result = generate(model, prompts, max_new_tokens=9)
    for b, prompt in enumerate(prompts):
        expected = hf_greedy(hf, prompt, 9)
        assert result.output_ids[b] == expected, f"request {b}"
        assert result.sequence_length[b] == len(expected)


def test_generation_stops_at_end_id_per_sequence(device):
    hf = random_hf_model(**CONFIGS[1])
    model = ftlab_model(hf, "fp32", device)
    prompts = random_prompts(101, [3, 6])
    free = generate(model, prompts, max_new_tokens=6)
    # make the 3rd generated token of request 0 its end token: it must stop there, request 1 must not
    end_id = free.generated_ids(0)[2]
    if end_id in free.generated_ids(1):
        pytest.skip("random model produced the same token in both requests")
    stopped = generate(model, prompts, max_new_tokens=6, end_id=end_id)
    assert stopped.output_ids[0] == free.output_ids[0][:3 + 3]
    assert stopped.sequence_length == [6, 12]
    assert stopped.output_ids[1] == free.output_ids[1]


def test_reference_model_agrees(device):
    """The plain-PyTorch twin (the bench's torch.compile peer) computes the same greedy tokens."""
    hf = random_hf_model(**CONFIGS[2])
    config = config_from_hf(hf.config.to_dict())
    ft = hf_to_ft_tensors({k.removeprefix("transformer."): v for k, v in hf.state_dict().items()}, config)
    prompts = random_prompts(67, [4, 9, 2])
    ref = reference_greedy(ReferenceGPT(config, ft), prompts, 6)
    ours = generate(GPT.from_ft_tensors(config, ft, device=device), prompts, max_new_tokens=6)
    assert [ours.generated_ids(b) for b in range(3)] == ref


def test_folded_layernorms_compute_the_same_model(device, monkeypatch):
    # fold_layernorms (the default when weights are loaded) against the checkpoint's tensors as they are
    cfg = CONFIGS[2]
    hf = random_hf_model(**cfg)
    folded = ftlab_model(hf, "fp32", device)
    monkeypatch.setenv("FTLAB_LN_PREFOLD", "0")
    plain = ftlab_model(hf, "fp32", device)
    b, p = folded.weights.blocks[0], plain.weights.blocks[0]
    assert torch.equal(b.ln1_weight, torch.ones_like(b.ln1_weight)) and not torch.equal(p.ln1_weight, b.ln1_weight)
    assert torch.equal(b.fc1_ln_row_sums, b.fc1_weight.float().sum(1)) and p.fc1_ln_row_sums is None
    # the tied LM head gets its own folded copy; the embedding still reads the checkpoint's wte
    assert torch.equal(folded.weights.wte, plain.weights.wte) and folded.weights.lm_head is not folded.weights.wte
    prompts = random_prompts(cfg["vocab_size"], [1, 7, 13, 2])
    for got, ref in zip(folded.logits(prompts), plain.logits(prompts)):
        assert_rel_close(got, ref, tol=1e-5, what="prefill logits, folded vs not")
    # the decode step (GEMVs with the row sums) too: greedy tokens of a ragged batch, and their log-probs
    out_f = generate(folded, prompts, max_new_tokens=6, top_k=1, return_log_probs=True)
    out_p = generate(plain, prompts, max_new_tokens=6, top_k=1, return_log_probs=True)
    assert out_f.output_ids == out_p.output_ids
    assert_rel_close(torch.tensor(out_f.output_log_probs), torch.tensor(out_p.output_log_probs), tol=1e-4,
                     what="log-probs")


def _small_m_cases():
    # fp32 everywhere; half precision only on a GPU (the interpreter's bf16 tl.dot is wrong)
    return [("fp32", 1e-4)] + [pytest.param(d, t, marks=pytest.mark.gpu) for d, t in (("fp16", 5e-3), ("bf16", 3e-2))]


@pytest.mark.parametrize("flag, value, uses, impl", [
    ("FTLAB_SMALL_M_GEMM", "1", "_small_m_gemm", "gemm"), ("FTLAB_SKINNY_LN", "1", "_skinny_blocks", "skinny"),
    ("FTLAB_SKINNY_LN", "stats", "_skinny_blocks", "skinny-stats"),
    ("FTLAB_SKINNY_LN", "rowstats", "_skinny_blocks", "skinny-rowstats")])
@pytest.mark.parametrize("dtype, tol", _small_m_cases())
def test_small_m_block_paths_match_hf(dtype, tol, flag, value, uses, impl, device, monkeypatch):
    # 5..64 rows (a batch of 6 decoding, a 20-token prefill) in the five-launch block with every GEMM on a Triton
    # tensor-core kernel and the LayerNorms folded in: FTLAB_SMALL_M_GEMM=1 the tiled gemm, FTLAB_SKINNY_LN=1 the
    # skinny GEMM (=stats: the LayerNorms' statistics from a launch of their own; =rowstats: from the out-projection's
    # and FC2's output tiles after the first). Logits against HF, greedy tokens against the LayerNorm + cuBLAS path
    monkeypatch.setenv("FTLAB_SKINNY_LN", "0")
    monkeypatch.setenv(flag, value)
    cfg = dict(n_embd=64, n_head=2, n_layer=3, vocab_size=67, n_inner=72)
    hf = random_hf_model(**cfg)
    model = ftlab_model(hf, dtype, device)
    prompts = random_prompts(cfg["vocab_size"], [2, 7, 1, 5, 3, 2])  # 20 tokens packed
    path = getattr(model, uses)
    assert path(20) and path(6) and not path(4) and not model._uses_cublas(6)
    assert model._block_impl(20) == model._block_impl(6) == impl
    if impl == "skinny-rowstats":  # tensor-parallel ranks take the statistics launches (an all-reduce follows)
        model.all_reduce = lambda t: t
        assert model._block_impl(20) == "skinny-stats"
        model.all_reduce = None
    for prompt, got in zip(prompts, model.logits(prompts)):
        with torch.no_grad():
            ref = hf(torch.tensor([prompt])).logits[0]
        assert_rel_close(got.float().cpu(), ref, tol=tol, what=f"{dtype} logits, prompt of {len(prompt)}")
    small = generate(model, prompts, max_new_tokens=5, use_cuda_graph=False)
    monkeypatch.setenv(flag, "0")
    monkeypatch.setenv("FTLAB_SKINNY", "0")  # cuBLAS (test_skinny_gemm_path_matches_hf checks the skinny GEMM)
    assert model._uses_cublas(6)
    assert generate(model, prompts, max_new_tokens=5, use_cuda_graph=False).output_ids == small.output_ids


@pytest.mark.gpu
@pytest.mark.parametrize("ln_folded", ["0", "1", "stats", "rowstats"])
@pytest.mark.parametrize("dtype, tol", [("fp16", 5e-3), ("bf16", 3e-2)])
def test_skinny_gemm_path_matches_hf(dtype, tol, ln_folded, device, monkeypatch):
    # on a GPU, 5..64 rows (a 20-token prefill, a batch of 6 decoding) take kernels/skinny_gemm.py, between the
    # LayerNorm kernels (FTLAB_SKINNY_LN=0) or with the LayerNorms folded in (=1, =stats with their statistics from
    # a launch before each folded GEMM, =rowstats from the GEMM before); prefill logits against HF, then
    # greedy decode (CUDA graphs on) step by step against HF's logits on the same prefix
    monkeypatch.setenv("FTLAB_SKINNY_LN", ln_folded)
    cfg = dict(n_embd=128, n_head=4, n_layer=3, vocab_size=97, n_inner=200)
    hf = random_hf_model(**cfg)
    model = ftlab_model(hf, dtype, device)
    prompts = random_prompts(cfg["vocab_size"], [2, 7, 1, 5, 3, 2])  # 20 tokens packed
    folded = ln_folded != "0"
    assert model._skinny_blocks(20) == folded and model._skinny_blocks(6) == folded
    assert model._uses_cublas(20) != folded and model._uses_cublas(6) != folded  # cublas = the LayerNorm + dense path
    for prompt, got in zip(prompts, model.logits(prompts)):
        with torch.no_grad():
            ref = hf(torch.tensor([prompt])).logits[0]
        assert_rel_close(got.float().cpu(), ref, tol=tol, what=f"{dtype} logits, prompt of {len(prompt)}")
    graphed = generate(model, prompts, max_new_tokens=6, return_log_probs=True)  # decode steps of 6 rows
    assert_decode_follows_hf(hf, graphed, tol, what=f"{dtype}, FTLAB_SKINNY_LN={ln_folded}")
    # the same kernels without CUDA graphs: the same tokens (split-K partials are summed in a fixed order)
    assert generate(model, prompts, max_new_tokens=6, use_cuda_graph=False).output_ids == graphed.output_ids


@pytest.mark.parametrize("partials", ["1", "0"])
@pytest.mark.parametrize("dtype, tol", _small_m_cases())
def test_fc2_split_k_products_summed_by_the_layernorm(dtype, tol, partials, device, monkeypatch):
    # the LayerNorm-launch block on the skinny GEMM (decode batches of 41..64 on a GPU): FC2 hands its split-K
    # products to the next block's LN_1, which sums them with the residual add (FTLAB_SKINNY_PARTIALS=0: the GEMM's
    # last program sums them). Where the model would not take the skinny GEMM (off a GPU, fp32) skinny_gemm_on is
    # forced (fp32 multiplies exactly there); the tiles split FC2's K = 200 in four. Logits and greedy decode (no
    # graphs) against HF
    import ftlab.model as model_module

    monkeypatch.setenv("FTLAB_SKINNY_LN", "0")
    monkeypatch.setenv("FTLAB_SKINNY_TILE", "16,64,4")
    monkeypatch.setenv("FTLAB_SKINNY_PARTIALS", partials)
    cfg = dict(n_embd=64, n_head=4, n_layer=2, vocab_size=97, n_inner=200)
    hf = random_hf_model(**cfg)
    model = ftlab_model(hf, dtype, device)
    if not model_module.skinny_enabled(model.device, model.dtype):
        monkeypatch.setattr(model_module, "skinny_gemm_on", lambda x, w: 1 <= x.shape[0] <= 64)
    asked, real = [], model_module.skinny_gemm
    monkeypatch.setattr(model_module, "skinny_gemm",
                        lambda *args, **kw: asked.append(kw.get("partials", False)) or real(*args, **kw))
    prompts = random_prompts(cfg["vocab_size"], [2, 7, 1, 5, 3, 2])  # 20 tokens packed, then 6 rows a step
    assert model._uses_cublas(20) and model._uses_cublas(6)  # the LayerNorm-launch block (on the skinny GEMM)
    for prompt, got in zip(prompts, model.logits(prompts)):
        with torch.no_grad():
            ref = hf(torch.tensor([prompt])).logits[0]
        assert_rel_close(got.float().cpu(), ref, tol=tol, what=f"{dtype} logits, prompt of {len(prompt)}")
    assert asked.count(True) == (cfg["n_layer"] - 1) * (partials == "1")  # one packed prefill: all but the last block
    result = generate(model, prompts, max_new_tokens=4, return_log_probs=True, use_cuda_graph=False)
    assert_decode_follows_hf(hf, result, tol, what=f"{dtype}, FTLAB_SKINNY_PARTIALS={partials}")


@pytest.mark.parametrize("dtype", ["fp32", pytest.param("fp16", marks=pytest.mark.gpu)])
def test_skinny_ln_blocks_default(dtype, device, monkeypatch):
    # which rows take the LayerNorm-folded skinny block unless FTLAB_SKINNY_LN says: on a GPU in fp16 / bf16 5..16
    # with the statistics inside the GEMM, 17..64 with them handed on by the residual GEMMs (one process), never on
    # the CPU or in fp32; FTLAB_SKINNY=0 (cuBLAS) and FTLAB_SMALL_M_GEMM=1 win
    monkeypatch.delenv("FTLAB_SKINNY_LN", raising=False)
    model = ftlab_model(random_hf_model(n_embd=64, n_head=2, n_layer=1, vocab_size=67), dtype, device)
    on = model.device.type == "cuda" and dtype != "fp32"
    assert [model._skinny_blocks(t) for t in (4, 5, 16, 17, 40, 41, 64)] == [False] + [on] * 6
    if on:
        assert [model._block_impl(t) for t in (5, 16, 17, 64)] == ["skinny"] * 2 + ["skinny-rowstats"] * 2
        model.all_reduce = lambda t: t  # tensor parallel: the statistics launches up to 40 rows, LayerNorms above
        assert [model._block_impl(t) for t in (17, 40, 41)] == ["skinny-stats", "skinny-stats", None]
        model.all_reduce = None
    monkeypatch.setenv("FTLAB_SKINNY_LN", "stats")
    assert model._block_impl(8) == model._block_impl(64) == "skinny-stats"
    monkeypatch.setenv("FTLAB_SKINNY_LN", "0")
    assert not model._skinny_blocks(8) and not model._skinny_blocks(20)
    monkeypatch.delenv("FTLAB_SKINNY_LN")
    monkeypatch.setenv("FTLAB_SMALL_M_GEMM", "1")
    assert not model._skinny_blocks(8) and model._small_m_gemm(8)
    monkeypatch.delenv("FTLAB_SMALL_M_GEMM")
    monkeypatch.setenv("FTLAB_SKINNY", "0")
    assert not model._skinny_blocks(8) and model._uses_cublas(8)
    monkeypatch.setenv("FTLAB_SKINNY_LN", "1")
    assert model._skinny_blocks(8) and model._skinny_blocks(64)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_lm_head_is_right_at_every_batch_size_of_the_real_vocabulary(dtype):
    # GPT-2's vocabulary (50257, not a multiple of 8) at K = 1024: each batch size takes its own kernel and tile
    # (linear()'s dispatch); the tensor-core GEMM's 64-row tiles once raced here (errors of ~0.5 at M = 33..63)
    from dataclasses import replace

    from ftlab.bench import GPT_345M
    from ftlab.checkpoint import random_ft_tensors
    from ftlab.config import compute_dtype
    from ftlab.kernels.linear import linear_reference

    config = replace(GPT_345M, num_layer=1)
    model = GPT.from_ft_tensors(config, random_ft_tensors(config, dtype=compute_dtype(dtype), device="cuda"),
                                dtype=dtype, device="cuda")
    w = model.weights
    tol = {"fp16": 5e-3, "bf16": 3e-2}[dtype]
    for M in (1, 4, 5, 17, 32, 33, 40, 48, 56, 63, 64, 65, 100):
        x = (torch.randn(M, config.hidden, device="cuda") * 2 + 0.5).to(model.dtype)
        ref = linear_reference(x.float(), w.lm_head.float(), w.lm_head_bias.float(), ln_weight=w.lnf_weight.float(),
                               ln_bias=w.lnf_bias.float(), ln_eps=config.layernorm_eps)
        logits = model.lm_logits(x)
        err = (logits.float() - ref).abs().max().item()  # elementwise: a few wrong logits must show
        assert err <= tol * ref.abs().max().item(), f"LM head at M={M}: max error {err}"
        assert torch.equal(model.lm_logits(x), logits), f"LM head at M={M}: a second run differs"


def one_partition_batch() -> tuple:
    """(HF model, ragged prompts, the GPU's SMs): a greedy decode batch of ~5 (sequence, head) pairs per SM."""
    cfg = dict(n_embd=256, n_head=16, n_layer=2, vocab_size=97)
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    batch = -(-5 * num_sms // cfg["n_head"])
    hf = random_hf_model(**cfg)
    lengths = torch.randint(1, 12, (batch,), generator=torch.Generator().manual_seed(3)).tolist()
    return hf, random_prompts(cfg["vocab_size"], lengths), num_sms


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, tol", [("fp16", 5e-3), ("bf16", 3e-2)])
def test_decode_batch_with_one_attention_partition_per_head_follows_hf(dtype, tol):
    # a decode batch large enough that decode attention runs one program per (sequence, head) (no partials, no
    # combine; kernels/decode_attention.py pick_decode_blocks): greedy tokens and log-probs (CUDA graphs on) against
    # HF on the same prefixes, ragged prompts
    from ftlab.kernels.decode_attention import pick_decode_blocks

    hf, prompts, num_sms = one_partition_batch()
    batch, heads = len(prompts), hf.config.n_head
    assert pick_decode_blocks(batch, heads, 256, 16, num_sms).part_size >= 256
    model = ftlab_model(hf, dtype, "cuda")
    result = generate(model, prompts, max_new_tokens=5, return_log_probs=True)
    assert_decode_follows_hf(hf, result, tol, what=f"{dtype}, batch {batch}")


@pytest.mark.gpu
def test_no_cycle_collection_runs_inside_a_capture():
    # a model dropped with its graphs in reference cycles goes at some later cycle collection; one that runs while
    # a stream captures destroys those graphs mid-capture and invalidates it (seen on an H100 in the GPU suite,
    # 2026-12-07: "operation failed due to a previous error during capture" in a prefill graph's capture).
    # Collections made as frequent as Python allows, old graphs left for them: none may run inside a capture
    import gc

    hf, prompts, _ = one_partition_batch()
    old = ftlab_model(hf, "fp16", "cuda")
    generate(old, prompts[:3], max_new_tokens=3)
    del old
    inside = []

    def watch(phase, info):
        if phase == "start":
            inside.append(torch.cuda.is_current_stream_capturing())

    threshold = gc.get_threshold()
    gc.callbacks.append(watch)
    gc.set_threshold(1, 1, 1)
    try:
        result = generate(ftlab_model(hf, "fp16", "cuda"), prompts[:3], max_new_tokens=3)
    finally:
        gc.set_threshold(*threshold)
        gc.callbacks.remove(watch)
    assert inside and not any(inside), f"{sum(inside)} of {len(inside)} collections ran inside a capture"
    assert len(result.output_ids) == 3


@pytest.mark.gpu
def test_greedy_graph_calls_repeat_bit_for_bit():
    # the captured greedy step (kernels/finish_step.py greedy_finish_step: argmax, bookkeeping and the next step's
    # embedding in one program per request, whose values several warps hold) gives the same tokens and log-probs
    # on every call, with new graphs every few calls. On an H100 (2026-12-07), before that kernel had barriers
    # between its loads and its stores, 26 of 200 calls of this batch (NaN left in the allocator's free blocks
    # before each) differed from the first at 1-4 (sequence, step) pairs, by up to 20x the tolerance of
    # test_decode_batch_with_one_attention_partition_per_head_follows_hf. The barriers are the fix this checks.
    hf, prompts, _ = one_partition_batch()
    first = None
    for call in range(60):
        if call % 5 == 0:
            model = ftlab_model(hf, "fp16", "cuda")
        result = generate(model, prompts, max_new_tokens=5, return_log_probs=True)
        got = (result.output_ids, result.output_log_probs)
        first = first or got
        assert got == first, f"call {call} of the same greedy batch differs from the first"
