"""Megatron-LM checkpoint -> c-model with tensor-parallel resharding T -> N, checked against the HF GPT-2 model the
checkpoint was built from (tests/megatron_util.py maps HF weights into Megatron's per-rank layout)."""
import argparse
import json
import shutil

import pytest
import torch

from ftlab.model import GPT
from ftlab.checkpoint import load_cmodel
from ftlab.config import GPTConfig
from ftlab.convert import megatron
from ftlab.convert.huggingface import config_from_hf, hf_to_ft_tensors
from ftlab.convert.megatron import (MegatronConversionError, add_megatron_arguments, convert_megatron,
                                    load_rank_file, run_megatron_cli)
from tests.megatron_util import make_megatron_checkpoint
from tests.util import assert_rel_close

transformers = pytest.importorskip("transformers")

VOCAB = 60  # divisible by 1, 2 and 4 ranks without padding; padded cases use 64


def random_hf_model(*, seed=0, vocab=VOCAB, untied=False, n_embd=24, n_head=4, n_layer=2, n_positions=32):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_embd=n_embd, n_head=n_head, n_layer=n_layer, vocab_size=vocab,
                                     n_positions=n_positions, bos_token_id=vocab - 1, eos_token_id=vocab - 1,
                                     tie_word_embeddings=not untied)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # HF initialises biases to 0 and LayerNorms to 1: perturb everything so every term counts
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def hf_ft_tensors(hf):
    config = config_from_hf(hf.config.to_dict())
    return hf_to_ft_tensors({k.removeprefix("transformer."): v for k, v in hf.state_dict().items()}, config)


def assert_tensors_equal_hf(out_dir, hf, *, padded_vocab=None):
    config, weights = load_cmodel(out_dir)
    expected = hf_ft_tensors(hf)
    vocab = hf.config.vocab_size
    assert config.vocab_size == (padded_vocab or vocab)
    assert (config.head_num, config.size_per_head, config.num_layer, config.max_pos_seq_len, config.inter_size) == \
        (hf.config.n_head, hf.config.n_embd // hf.config.n_head, hf.config.n_layer, hf.config.n_positions,
         4 * hf.config.n_embd)
    assert sorted(weights) == sorted(expected)
    for name, ref in expected.items():
        got = weights[name]
        if name in ("model.wte", "model.lm_head.weight"):
            assert got.shape == (padded_vocab or vocab, hf.config.n_embd), name
            got = got[:vocab]  # Megatron's padding rows have no HF counterpart
        torch.testing.assert_close(got, ref, rtol=0, atol=0, msg=name)
    return config


def assert_logits_equal_hf(out_dir, hf, lengths=(1, 6, 11)):
    model = GPT.from_cmodel(out_dir, dtype="fp32")  # the GPU when there is one, else the Triton interpreter
    vocab = hf.config.vocab_size
    prompts = [torch.randint(0, vocab, (n,)).tolist() for n in lengths]
    for prompt, got in zip(prompts, model.logits(prompts)):
        with torch.no_grad():
            ref = hf(torch.tensor([prompt])).logits[0]
        assert_rel_close(got.cpu()[:, :vocab], ref, tol=1e-4, what=f"logits of a {len(prompt)}-token prompt")


def write_tokenizer(directory, vocab=VOCAB):
    tokens = {f"tok{i}": i for i in range(vocab - 1)}
    tokens["<|endoftext|>"] = vocab - 1
    (directory / "gpt2-vocab.json").write_text(json.dumps(tokens))
    (directory / "gpt2-merges.txt").write_text("#version: 0.2\n")


def edit_rank(ckpt_dir, rank, edit, iteration_dir="release"):
    """Load one rank file, apply edit(checkpoint, language_model) and save it back."""
    path = ckpt_dir / iteration_dir / f"mp_rank_{rank:02d}" / "model_optim_rng.pt"
    checkpoint = load_rank_file(path)  # memory-mapped: save to another file, then replace
    if checkpoint["args"] is not None:
        checkpoint["args"].model_type = None  # the fake Megatron enum cannot be pickled again
    edit(checkpoint, checkpoint["model"]["language_model"])
    torch.save(checkpoint, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path)


# --- 1. tensors and logits equal HF's -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_model():
    return random_hf_model(seed=7)


@pytest.mark.parametrize("version", [0, 2])
@pytest.mark.parametrize("T", [1, 2, 4])
def test_tensors_equal_hf_for_every_reshard(tmp_path, hf_model, T, version):
    ckpt = make_megatron_checkpoint(hf_model, tmp_path / "ckpt", T, version)
    for i_g in (1, 2, 4):
        out = convert_megatron(ckpt, tmp_path / "out", infer_gpu_num=i_g, progress=False)
        assert out == tmp_path / "out" / f"{i_g}-gpu"
        config = assert_tensors_equal_hf(out, hf_model)
        assert config.tensor_para_size == i_g
        assert len(list(out.glob("model.layers.0.attention.query_key_value.weight.*.bin"))) == i_g


@pytest.mark.parametrize("T, version, variant", [
    (2, 3, dict(encoder_prefix=True, self_attention=True)),
    (4, 1, {}),
    (2, 2, dict(pad_vocab_to=64)),
    (1, 0, dict(release=False, dtype=torch.float16)),
])
def test_variants_equal_hf(tmp_path, hf_model, T, version, variant):
    if variant.get("dtype") == torch.float16:  # an fp16 checkpoint: compare with the HF model rounded the same way
        hf = random_hf_model(seed=7)
        with torch.no_grad():
            for p in hf.parameters():
                p.copy_(p.half().float())
    else:
        hf = hf_model
    ckpt = make_megatron_checkpoint(hf, tmp_path / "ckpt", T, version, **variant)
    for i_g in (1, 4):
        out = convert_megatron(ckpt, tmp_path / "out", infer_gpu_num=i_g, progress=False)
        assert_tensors_equal_hf(out, hf, padded_vocab=variant.get("pad_vocab_to"))


def test_untied_output_layer_becomes_lm_head(tmp_path):
    hf = random_hf_model(seed=3, untied=True)
    ckpt = make_megatron_checkpoint(hf, tmp_path / "ckpt", 2, 2, pad_vocab_to=64)
    out = convert_megatron(ckpt, tmp_path / "out", infer_gpu_num=2, progress=False)
    assert (out / "model.lm_head.weight.bin").is_file()
    assert_tensors_equal_hf(out, hf, padded_vocab=64)


@pytest.mark.parametrize("T, version, i_g, pad", [(2, 0, 1, None), (4, 2, 2, 64), (1, 2, 4, None)])
def test_logits_equal_hf(tmp_path, T, version, i_g, pad):
    hf = random_hf_model(seed=11)
    ckpt = make_megatron_checkpoint(hf, tmp_path / "ckpt", T, version, pad_vocab_to=pad,
                                    encoder_prefix=T == 1, self_attention=T == 1)
    out = convert_megatron(ckpt, tmp_path / "out", infer_gpu_num=i_g, progress=False)
    assert_logits_equal_hf(out, hf)


def test_checkpoint_layouts_and_options(tmp_path, hf_model):
    # the mp_rank_XX directories given directly, model_rng.pt, the legacy (non-zip) torch format, fp16 output
    make_megatron_checkpoint(hf_model, tmp_path / "ckpt", 2, 2, legacy_format=True, filename="model_rng.pt")
    out = convert_megatron(tmp_path / "ckpt" / "release", tmp_path / "out", infer_gpu_num=2,
                           weight_data_type="fp16", progress=False)
    config, weights = load_cmodel(out)
    assert config.weight_data_type == "fp16" and weights["model.wpe"].dtype == torch.float16
    torch.testing.assert_close(weights["model.wpe"].float(), hf_model.transformer.wpe.weight.half().float(),
                               rtol=0, atol=0)
    # no args in the checkpoint (like the public GPT-345M one): --head-num supplies the head count
    make_megatron_checkpoint(hf_model, tmp_path / "noargs", 2, 0, with_args=False)
    out = convert_megatron(tmp_path / "noargs", tmp_path / "out2", infer_gpu_num=4, head_num=4, progress=False)
    assert_tensors_equal_hf(out, hf_model)


def test_tokenizer_files_and_original_vocab(tmp_path, hf_model):
    ckpt = make_megatron_checkpoint(hf_model, tmp_path / "ckpt", 2, 2, pad_vocab_to=64)
    write_tokenizer(ckpt)
    out = convert_megatron(ckpt, tmp_path / "out", infer_gpu_num=1, progress=False)
    assert (out / "gpt2-vocab.json").read_bytes() == (ckpt / "gpt2-vocab.json").read_bytes()
    assert (out / "gpt2-merges.txt").is_file()
    config = GPTConfig.from_ini(out / "config.ini")
    assert (config.vocab_size, config.end_id, config.start_id) == (64, VOCAB - 1, VOCAB - 1)
    assert f"original_vocab_size = {VOCAB}" in (out / "config.ini").read_text()


def test_cli_functions(tmp_path, hf_model):
    make_megatron_checkpoint(hf_model, tmp_path / "ckpt", 2, 2)
    parser = argparse.ArgumentParser()
    add_megatron_arguments(parser)
    args = parser.parse_args(["-i", str(tmp_path / "ckpt"), "-o", str(tmp_path / "out"), "-t_g", "2", "-i_g", "4",
                              "--weight-data-type", "fp32", "--no-progress"])
    out = run_megatron_cli(args)
    assert out == tmp_path / "out" / "4-gpu"
    assert_tensors_equal_hf(out, hf_model)
    with pytest.raises(FileExistsError, match="--force"):
        run_megatron_cli(args)
    (out / "model.wte.bin").write_bytes(b"stale")
    args = parser.parse_args(["-i", str(tmp_path / "ckpt"), "-o", str(tmp_path / "out"), "-i_g", "4", "--force",
                              "--head-num", "4", "--no-progress"])
    assert run_megatron_cli(args) == out
    assert_tensors_equal_hf(out, hf_model)


def test_ft_flag_spellings_and_diverged_replicas_warn(tmp_path, hf_model):
    ckpt = make_megatron_checkpoint(hf_model, tmp_path / "ckpt", 2, 0)

    def nudge(_, lm):
        lm["transformer"]["layers.1.post_attention_layernorm.bias"] += 1e-3
    edit_rank(ckpt, 1, nudge)
    parser = argparse.ArgumentParser()
    add_megatron_arguments(parser)
    args = parser.parse_args(["-in_file", str(ckpt), "-saved_dir", str(tmp_path / "out"), "-infer_gpu_num", "2",
                              "-trained_tensor_parallel_size", "2", "-head_num", "4", "-weight_data_type", "fp32",
                              "--no-progress"])
    with pytest.warns(UserWarning, match=r"1 replicated tensor\(s\) differ between the 2 ranks .*"
                                         r"transformer.layers.1.post_attention_layernorm.bias"):
        out = run_megatron_cli(args)
    assert_tensors_equal_hf(out, hf_model)  # rank 0's copy is the one used


# --- 2. resharding is exact: every T gives the same bytes -------------------------------------------------------

def tree_bytes(directory):
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("T, version, N", [(2, 2, 4), (4, 0, 1), (4, 1, 2)])
def test_resharding_is_byte_identical_to_single_rank(tmp_path, hf_model, T, version, N):
    single = make_megatron_checkpoint(hf_model, tmp_path / "single", 1, 0, pad_vocab_to=64)
    sharded = make_megatron_checkpoint(hf_model, tmp_path / "sharded", T, version, pad_vocab_to=64,
                                       encoder_prefix=True)
    for ckpt in (single, sharded):
        write_tokenizer(ckpt)
    reference = tree_bytes(convert_megatron(single, tmp_path / "a", infer_gpu_num=N, progress=False))
    resharded = tree_bytes(convert_megatron(sharded, tmp_path / "b", infer_gpu_num=N, progress=False))
    assert "config.ini" in reference and f"model.layers.1.mlp.dense_4h_to_h.weight.{N - 1}.bin" in reference
    assert sorted(resharded) == sorted(reference)
    for name, data in reference.items():
        assert resharded[name] == data, name


# --- 3. bad inputs: clear errors, no output left behind --------------------------------------------------------

def assert_fails_cleanly(tmp_path, ckpt, message, **kwargs):
    out = tmp_path / "out"
    with pytest.raises(MegatronConversionError, match=message):
        convert_megatron(ckpt, out, progress=False, **{"infer_gpu_num": 1, **kwargs})
    assert not out.exists(), f"partial output left: {list(out.rglob('*'))}"


def test_missing_rank_directory(tmp_path, hf_model):
    ckpt = make_megatron_checkpoint(hf_model, tmp_path / "ckpt", 4, 2)
    shutil.rmtree(ckpt / "release" / "mp_rank_02")
    assert_fails_cleanly(tmp_path, ckpt, r"mp_rank_02: rank directory missing")
    shutil.rmtree(ckpt / "release" / "mp_rank_01")
    shutil.rmtree(ckpt / "release" / "mp_rank_03")
    assert_fails_cleanly(tmp_path, ckpt, r"mp_rank_01: rank directory missing", trained_gpu_num=2)
    # only mp_rank_00 left and no -t_g: the checkpoint's own args expose the missing ranks
    assert_fails_cleanly(tmp_path, ckpt, r"tensor_model_parallel_size=4 but 1 rank directory is being read")
    (ckpt / "release" / "mp_rank_00" / "model_optim_rng.pt").unlink()
    assert_fails_cleanly(tmp_path, ckpt, r"mp_rank_00: no model_optim_rng.pt or model_rng.pt")


def test_more_rank_directories_than_trained_gpu_num(tmp_path, hf_model):
    ckpt = make_megatron_checkpoint(hf_model, tmp_path / "ckpt", 2, 2)
    assert_fails_cleanly(tmp_path, ckpt, r"up to mp_rank_01 but -t_g/--trained-gpu-num is 1", trained_gpu_num=1)


def test_shapes_inconsistent_between_ranks(tmp_path, hf_model):
    ckpt = make_megatron_checkpoint(hf_model, tmp_path / "ckpt", 2, 2, with_args=False)

    def shrink(_, lm):
        layers = lm["transformer"]
        layers["layers.1.mlp.dense_h_to_4h.weight"] = layers["layers.1.mlp.dense_h_to_4h.weight"][:-4].clone()
    edit_rank(ckpt, 1, shrink)
    assert_fails_cleanly(tmp_path, ckpt, r"mp_rank_01/model_optim_rng.pt: tensor "
                                         r"'transformer.layers.1.mlp.dense_h_to_4h.weight' has shape \(44, 24\), "
                                         r"expected \(48, 24\)", head_num=4)


def test_heads_not_divisible_by_infer_gpu_num(tmp_path, hf_model):
    ckpt = make_megatron_checkpoint(hf_model, tmp_path / "ckpt", 2, 2)
    assert_fails_cleanly(tmp_path, ckpt, r"head_num=4 is not divisible by -i_g/--infer-gpu-num=3", infer_gpu_num=3)
    assert_fails_cleanly(tmp_path, ckpt, r"head_num=4 is not divisible by -i_g/--infer-gpu-num=8", infer_gpu_num=8)


def test_unknown_and_missing_tensors(tmp_path, hf_model):
    ckpt = make_megatron_checkpoint(hf_model, tmp_path / "ckpt", 2, 2)
    extra = {"layers.0.attention.rotary_emb.inv_freq": torch.ones(3)}
    edit_rank(ckpt, 0, lambda _, lm: lm["transformer"].update(extra))
    assert_fails_cleanly(tmp_path, ckpt, r"mp_rank_00/model_optim_rng.pt: 1 unexpected tensor.*"
                                         r"transformer.layers.0.attention.rotary_emb.inv_freq")
    ckpt = make_megatron_checkpoint(hf_model, tmp_path / "ckpt2", 2, 2)
    edit_rank(ckpt, 1, lambda _, lm: lm["transformer"].pop("layers.0.mlp.dense_4h_to_h.bias"))
    assert_fails_cleanly(tmp_path, ckpt, r"mp_rank_01/model_optim_rng.pt: 1 tensor\(s\) missing.*"
                                         r"transformer.layers.0.mlp.dense_4h_to_h.bias")


def test_bad_latest_checkpointed_iteration(tmp_path, hf_model):
    ckpt = make_megatron_checkpoint(hf_model, tmp_path / "ckpt", 1, 2, release=False, iteration=1200)
    assert convert_megatron(ckpt, tmp_path / "ok", progress=False).is_dir()  # iter_0001200 is found
    (ckpt / "latest_checkpointed_iteration.txt").write_text("500\n")
    assert_fails_cleanly(tmp_path, ckpt, r"names iteration '500' but .*iter_0000500 does not exist")
    (ckpt / "latest_checkpointed_iteration.txt").write_text("last one")
    assert_fails_cleanly(tmp_path, ckpt, r"expected 'release' or an iteration number, got 'last one'")
    assert_fails_cleanly(tmp_path, tmp_path / "nowhere", r"nowhere: checkpoint directory not found")
    assert_fails_cleanly(tmp_path, tmp_path / "ok", r"not a Megatron checkpoint")


def test_head_count_required_and_consistent(tmp_path, hf_model):
    ckpt = make_megatron_checkpoint(hf_model, tmp_path / "ckpt", 2, 0, with_args=False)
    assert_fails_cleanly(tmp_path, ckpt, r"checkpoint_version 0.0\) records no num_attention_heads; pass --head-num")
    assert_fails_cleanly(tmp_path, ckpt, r"head count 3 is not divisible|not divisible by the head count 3",
                         head_num=3)
    ckpt = make_megatron_checkpoint(hf_model, tmp_path / "ckpt2", 2, 0)
    assert_fails_cleanly(tmp_path, ckpt, r"--head-num 8 contradicts the checkpoint's args.num_attention_heads=4",
                         head_num=8)


def test_unreadable_file_and_unsupported_models(tmp_path, hf_model):
    ckpt = make_megatron_checkpoint(hf_model, tmp_path / "ckpt", 2, 2)
    edit_rank(ckpt, 0, lambda c, _: setattr(c["args"], "swiglu", True))
    assert_fails_cleanly(tmp_path, ckpt, r"args.swiglu=True \(SwiGLU MLP\) is not supported")
    (ckpt / "release" / "mp_rank_01" / "model_optim_rng.pt").write_bytes(b"not a checkpoint")
    edit_rank(ckpt, 0, lambda c, _: setattr(c["args"], "swiglu", False))
    assert_fails_cleanly(tmp_path, ckpt, r"mp_rank_01/model_optim_rng.pt: cannot be read as a torch checkpoint")
    ckpt = make_megatron_checkpoint(hf_model, tmp_path / "ckpt2", 1, 2)
    (ckpt / "release" / "mp_rank_00").rename(ckpt / "release" / "mp_rank_00_000")
    assert_fails_cleanly(tmp_path, ckpt, r"pipeline-parallel checkpoint")


def test_failure_while_writing_leaves_nothing(tmp_path, hf_model, monkeypatch):
    ckpt = make_megatron_checkpoint(hf_model, tmp_path / "ckpt", 2, 2)
    real_join = megatron.join_shards
    calls = []

    def failing_join(kind, shards, config, version):
        calls.append(kind)
        if len(calls) == 10:
            raise OSError("disk full")
        return real_join(kind, shards, config, version)

    monkeypatch.setattr(megatron, "join_shards", failing_join)
    with pytest.raises(OSError, match="disk full"):
        convert_megatron(ckpt, tmp_path / "deep" / "out", infer_gpu_num=2, progress=False)
    assert not (tmp_path / "deep").exists()
    # an existing output survives a failed --force conversion untouched
    monkeypatch.setattr(megatron, "join_shards", real_join)
    out = convert_megatron(ckpt, tmp_path / "out", infer_gpu_num=2, progress=False)
    before = tree_bytes(tmp_path / "out")
    calls.clear()
    monkeypatch.setattr(megatron, "join_shards", failing_join)
    with pytest.raises(OSError, match="disk full"):
        convert_megatron(ckpt, tmp_path / "out", infer_gpu_num=2, progress=False, force=True)
    assert tree_bytes(tmp_path / "out") == before and out.is_dir()
