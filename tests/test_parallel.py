"""Tensor x layer parallelism on CPU processes (gloo): the same tokens and logits as one process."""
import json
import os
import subprocess
import sys

import pytest

from ftlab.checkpoint import random_ft_tensors, write_cmodel
from ftlab.config import GPTConfig
from ftlab.model import GPT
from ftlab.generate import generate
from ftlab.parallel import ParallelError, run_workers
from tests.util import assert_rel_close

CFG = GPTConfig(head_num=4, size_per_head=8, num_layer=2, vocab_size=61, max_pos_seq_len=32, start_id=0, end_id=60)
PROMPTS = [[3, 14, 15, 9, 2], [6], [5, 35, 8]]
GREEDY = dict(max_new_tokens=6)
SAMPLED = dict(max_new_tokens=6, top_k=0, top_p=0.95, temperature=1.3, random_seed=[1, 2, 3])
BEAMS = dict(max_new_tokens=6, beam_width=3, len_penalty=0.8)
DIVERSE_BEAMS = dict(max_new_tokens=5, beam_width=2, beam_search_diversity_rate=0.7, repetition_penalty=1.5)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("par")
    weights = random_ft_tensors(CFG, seed=11, std=0.3)
    return {tp: write_cmodel(root, CFG, weights, tensor_para_size=tp) for tp in (1, 2)}


@pytest.fixture(scope="module")
def single_process(model_dirs):
    model = GPT.from_cmodel(model_dirs[1], dtype="fp32", device="cpu")
    return (generate(model, PROMPTS, **GREEDY), generate(model, PROMPTS, **SAMPLED), model.logits(PROMPTS),
            generate(model, PROMPTS, **BEAMS), generate(model, PROMPTS, **DIVERSE_BEAMS))


@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2), (2, 2)])
def test_parallel_matches_single_process(model_dirs, single_process, tp, pp):
    jobs = [{"generate": dict(GREEDY, prompts=PROMPTS)}, {"generate": dict(SAMPLED, prompts=PROMPTS)},
            {"logits": PROMPTS}, {"generate": dict(BEAMS, prompts=PROMPTS)},
            {"generate": dict(DIVERSE_BEAMS, prompts=PROMPTS)}]
    greedy, sampled, logits, *beams = run_workers(model_dirs[tp], jobs, tensor_para_size=tp, layer_para_size=pp,
                                                  dtype="fp32", layer_para_batch_size=2, timeout_s=240)
    ref_greedy, ref_sampled, ref_logits, *ref_beams = single_process
    assert greedy.output_ids == ref_greedy.output_ids
    assert sampled.output_ids == ref_sampled.output_ids
    assert sampled.output_ids != greedy.output_ids  # the sampled run really sampled
    for got, ref in zip(logits, ref_logits):
        assert_rel_close(got, ref, tol=1e-5, what=f"logits T={tp} L={pp}")
    for got, ref, width in zip(beams, ref_beams, (BEAMS["beam_width"], DIVERSE_BEAMS["beam_width"])):
        assert got.output_ids == ref.output_ids and got.beams == ref.beams
        for got_scores, ref_scores in zip(got.beam_scores, ref.beam_scores):
            assert got_scores == pytest.approx(ref_scores, rel=1e-5)
        assert any(len(hyps) == width for hyps in got.beams)
    assert beams[0].beams != beams[1].beams  # the second search's settings changed what it found


def test_files_split_for_another_n(model_dirs):
    with pytest.raises(ParallelError, match="split for tensor_para_size=1, not 2"):
        run_workers(model_dirs[1], [{"logits": PROMPTS}], tensor_para_size=2, dtype="fp32", timeout_s=120)


def test_process_count_mismatch_fails_on_every_rank_without_hanging(model_dirs):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "ftlab",
           "generate", "-m", str(model_dirs[2]), "--input-ids", "1,2", "--max-new-tokens", "2",
           "--tensor-para-size", "2", "--layer-para-size", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=dict(os.environ))
    assert proc.returncode != 0
    for rank in (0, 1):
        assert f"(rank {rank}): error: 2 processes but tensor_para_size=2 x layer_para_size=2 = 4" in proc.stderr


def test_cli_beam_search_across_two_stages_matches_one_process(model_dirs, single_process):
    # `torchrun ... ftlab generate --layer-para-size 2 --beam-width 3` prints what one process finds and exits 0 on
    # every rank (before the CLI closed its engine, 2 of 8 such runs aborted at exit after printing)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "ftlab",
           "generate", "-m", str(model_dirs[1]), "--input-ids", ",".join(map(str, PROMPTS[0])), "--dtype", "fp32",
           "--max-new-tokens", str(BEAMS["max_new_tokens"]), "--beam-width", str(BEAMS["beam_width"]),
           "--len-penalty", str(BEAMS["len_penalty"]), "--layer-para-size", "2", "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    ref = single_process[3]
    assert out["output_ids"] == ref.output_ids[:1] and out["beams"] == ref.beams[:1]


def test_close_frees_captured_graphs_before_leaving(model_dirs):
    # captured NCCL all-reduces in live CUDA graphs hang destroy_process_group on GPUs: close() drops them first
    from ftlab.parallel import ParallelEngine

    engine = ParallelEngine(model_dirs[1], dtype="fp32")
    generate(engine, PROMPTS, **GREEDY)
    engine.model.graph_cache["stand-in"] = engine.stage_graphs["stand-in"] = object()
    engine.close()
    assert engine.model.graph_cache == {} and engine.stage_graphs == {}
