"""ftlab.host_marks on the CPU: the phases of a generate() call are marked in order and put back afterwards."""
import numpy as np
import torch

from ftlab import generate as gen
from ftlab.checkpoint import random_ft_tensors
from ftlab.config import GPTConfig
from ftlab.host_marks import PHASES, call_marks, host_functions, host_ops, marked
from ftlab.model import GPT


def test_marks_follow_a_call_and_leave_every_phase_as_it_was(device):
    before = [(owner, attr, owner.__dict__.get(attr)) for owner, attr in PHASES]
    cfg = GPTConfig(head_num=2, size_per_head=8, num_layer=2, vocab_size=97, max_pos_seq_len=64, start_id=0, end_id=96)
    model = GPT.from_ft_tensors(cfg, random_ft_tensors(cfg, seed=3, device=torch.device(device)), dtype="fp32", device=torch.device(device))
    prompts = np.random.default_rng(5).integers(0, cfg.vocab_size, size=(3, 7))
    m = call_marks(model, prompts, n_out=4, repeats=2, warmup=1, top_k=5, random_seed=11)
    order = ["_checked_prompts start", "pack_prompts_host start", "prefill launch", "last read end", "return"]
    assert [m[k] for k in order] == sorted(m[k] for k in order)
    # a graph call (the default on a GPU) launches its prefill before its parameters are built (generate's
    # _launch_early), an eager call after
    assert m["RequestParams.build start"] < m["last read end"]
    assert (m["prefill launch"] < m["RequestParams.build start"]) == (device == "cuda")
    assert m["DeviceColumns.load total"] > 0  # eager: the prompts' copy; on a GPU also the graph's request columns
    assert m["_HostRows.wait total"] >= m["_HostRows.wait first dur"] > 0
    assert [(owner, attr, owner.__dict__.get(attr)) for owner, attr in PHASES] == before
    # an exception inside the block restores them too
    try:
        with marked():
            assert gen.RequestParams.__dict__["build"] is not before[2][2]
            raise KeyError("boom")
    except KeyError:
        pass
    assert [(owner, attr, owner.__dict__.get(attr)) for owner, attr in PHASES] == before


def test_host_ops_lists_the_calls_operators(device):
    cfg = GPTConfig(head_num=2, size_per_head=8, num_layer=1, vocab_size=97, max_pos_seq_len=64, start_id=0, end_id=96)
    model = GPT.from_ft_tensors(cfg, random_ft_tensors(cfg, seed=4, device=torch.device(device)), dtype="fp32",
                                device=torch.device(device))
    prompts = np.random.default_rng(6).integers(0, cfg.vocab_size, size=(2, 5))
    table = host_ops(model, prompts, n_out=3, calls=2, warmup=1, row_limit=10)
    assert "Self CPU" in table and "aten::" in table
    functions = host_functions(model, prompts, n_out=3, calls=2, warmup=1, row_limit=10)
    assert "tottime" in functions and "function calls" in functions
