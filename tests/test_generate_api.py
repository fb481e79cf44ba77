"""Generation API and `ftlab generate`: streaming, per-request parameters, JSON output, clear errors."""
import json

import numpy as np
import pytest
import torch

from ftlab.checkpoint import random_ft_tensors, write_cmodel
from ftlab.cli import main
from ftlab.config import GPTConfig
from ftlab.generate import GenerationError, cache_capacity, generate, lru_get, stream
from ftlab.model import GPT, DeviceColumns, host_to_device, pack_prompts_host

CFG = GPTConfig(head_num=2, size_per_head=8, num_layer=2, vocab_size=61, max_pos_seq_len=24, start_id=0, end_id=60)


@pytest.fixture(scope="module")
def model():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return GPT.from_ft_tensors(CFG, random_ft_tensors(CFG, seed=3, std=0.3), dtype="fp32", device=device)


def test_stream_yields_what_generate_returns(model):
    prompts = [[1, 2, 3], [4]]
    steps = list(stream(model, prompts, max_new_tokens=5, top_k=0, top_p=0.9, random_seed=[7, 8]))
    result = generate(model, prompts, max_new_tokens=5, top_k=0, top_p=0.9, random_seed=[7, 8])
    assert [s.step for s in steps] == list(range(len(steps)))
    for b in range(2):
        produced = []
        for s in steps:
            produced.append(s.token_ids[b])
            if s.finished[b]:
                break
        assert result.generated_ids(b) == produced
    assert result.input_length == [3, 1]


def test_same_seed_reproduces_and_seeds_differ(model):
    prompts = [[5, 6, 7]] * 4
    seeds = [11, 11, 12, 13]
    a = generate(model, prompts, max_new_tokens=8, top_k=0, temperature=1.5, random_seed=seeds)
    b = generate(model, prompts, max_new_tokens=8, top_k=0, temperature=1.5, random_seed=seeds)
    assert a.output_ids == b.output_ids
    assert a.output_ids[0] == a.output_ids[1]
    assert len({tuple(ids) for ids in a.output_ids[1:]}) > 1, "different seeds gave identical samples"


def test_per_request_parameters_in_one_batch(model):
    prompts = [[9, 10], [9, 10], [9, 10]]
    mixed = generate(model, prompts, max_new_tokens=6, top_k=[1, 0, 1], temperature=[1.0, 2.0, 1.0],
                     random_seed=[1, 2, 3])
    greedy = generate(model, [[9, 10]], max_new_tokens=6)
    assert mixed.output_ids[0] == greedy.output_ids[0] == mixed.output_ids[2]


def test_on_step_gets_each_step_as_it_is_produced(model, monkeypatch):
    decoded, seen = [], []
    decode = model.decode
    monkeypatch.setattr(model, "decode", lambda *args: decoded.append(1) or decode(*args))

    def on_step(step):
        seen.append((step.step, len(decoded)))  # decode steps run so far
    result = generate(model, [[1, 2, 3], [4]], max_new_tokens=6, use_cuda_graph=False, on_step=on_step, top_k=0,
                      random_seed=5)
    steps = list(stream(model, [[1, 2, 3], [4]], max_new_tokens=6, use_cuda_graph=False, top_k=0, random_seed=5))
    assert [s for s, _ in seen] == [s.step for s in steps]
    # step s is handed over once it exists: at most one more step was queued behind it
    assert all(done <= s + 1 for s, done in seen)
    assert result.output_ids == generate(model, [[1, 2, 3], [4]], max_new_tokens=6, top_k=0, random_seed=5).output_ids


def test_log_probs_are_returned(model):
    result = generate(model, [[3, 4, 5]], max_new_tokens=4, return_log_probs=True)
    logits = model.logits([result.output_ids[0][:-1]])[0][2:]  # logits that chose each generated token
    expected = torch.log_softmax(logits.float().cpu(), -1)[torch.arange(4), torch.tensor(result.generated_ids(0))]
    torch.testing.assert_close(torch.tensor(result.output_log_probs[0]), expected, rtol=1e-4, atol=1e-5)
    assert result.cum_log_probs[0] == pytest.approx(sum(result.output_log_probs[0]))


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompts=[list(range(1, 21))], max_new_tokens=5), "needs 25 positions, more than .*max_pos_seq_len=24"),
    (dict(prompts=[[1]], max_new_tokens=2, top_p=1.5), "top_p"),
    (dict(prompts=[[1]], max_new_tokens=2, top_p=0.0), "top_p"),
    (dict(prompts=[[1]], max_new_tokens=2, top_k=-1), "top_k"),
    (dict(prompts=[[1]], max_new_tokens=2, temperature=0.0), "temperature"),
    (dict(prompts=[[1], [2]], max_new_tokens=2, top_k=[1, 2, 3]), "top_k has 3 values for a batch of 2"),
    (dict(prompts=[[1], []], max_new_tokens=2), "request 1 has an empty prompt"),
    (dict(prompts=[[1, 61]], max_new_tokens=2), "token id 61 is outside the vocabulary"),
    (dict(prompts=[[1], [2.5]], max_new_tokens=2), "request 1: the prompt must be a flat sequence of integer"),
    (dict(prompts=[[[1, 2]]], max_new_tokens=2), r"integer token ids, got int64 values of shape \(1, 2\)"),
    (dict(prompts=[[1]], max_new_tokens=0), "max_new_tokens must be a positive integer"),
    # one (B, T) array is checked as a whole; a bad one still gets the request named
    (dict(prompts=np.array([[1, 2], [3, 61]]), max_new_tokens=2), "request 1: token id 61 is outside the vocabulary"),
    (dict(prompts=torch.tensor([[1, 2], [-4, 3]]), max_new_tokens=2), "request 1: token id -4 is outside"),
    (dict(prompts=np.ones((2, 20), np.uint16), max_new_tokens=5), "request 0: prompt of 20 tokens .* needs 25"),
    # requests sharing their parameters are checked once: a bad value in a later request is still named
    (dict(prompts=[[1]] * 3, max_new_tokens=2, top_k=[1, 1, -1]), r"top_k\[2\] = -1 is negative"),
    (dict(prompts=[[1]] * 3, max_new_tokens=2, end_id=[5, 5, 61]), "end_id of request 2 = 61 is outside"),
])
def test_bad_requests_get_clear_errors(model, kwargs, message):
    with pytest.raises(GenerationError, match=message):
        generate(model, **kwargs)


def test_unknown_dtype_is_refused():
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        GPT.from_ft_tensors(CFG, random_ft_tensors(CFG), dtype="fp8")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cmodel")
    return write_cmodel(root, CFG, random_ft_tensors(CFG, seed=4, std=0.3), tensor_para_size=2)


def test_cli_generate_json(model_dir, capsys):
    assert main(["generate", "-m", str(model_dir), "--input-ids", "1,2,3;4,5", "--max-new-tokens", "4",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["output_ids"][0][:3] == [1, 2, 3] and out["output_ids"][1][:2] == [4, 5]
    assert out["sequence_length"] == [len(ids) for ids in out["output_ids"]]
    assert 3 < out["sequence_length"][0] <= 3 + 4 and 2 < out["sequence_length"][1] <= 2 + 4
    assert "text" not in out  # a 61-token vocabulary has no tokenizer


@pytest.mark.parametrize("argv, message", [
    (["--input-ids", "1,2", "--top-p", "2"], "top_p"),
    (["--input-ids", "1,2", "--dtype", "fp64"], "unknown dtype 'fp64'"),
    (["--input-ids", "1," + ",".join(["2"] * 30)], "max_pos_seq_len=24"),
    (["--prompt", "hello"], "no tokenizer files"),
])
def test_cli_errors(model_dir, capsys, argv, message):
    assert main(["generate", "-m", str(model_dir), "--max-new-tokens", "4", *argv]) == 2
    assert message in capsys.readouterr().err


def test_cli_missing_file_is_named(model_dir, tmp_path, capsys):
    import shutil

    broken = tmp_path / "2-gpu"
    shutil.copytree(model_dir, broken)
    (broken / "model.wpe.bin").unlink()
    assert main(["generate", "-m", str(broken), "--input-ids", "1", "--max-new-tokens", "4"]) == 2
    assert "model.wpe.bin: missing file" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.parametrize("prefill_first", ["0", "1"])
def test_cuda_graph_on_and_off_agree(prefill_first, model, monkeypatch):
    monkeypatch.setenv("FTLAB_PREFILL_FIRST", prefill_first)  # =1: context phase launched before the parameters
    model.graph_cache.clear()
    prompts = [[1, 2, 3], [7], [4, 4, 4, 4]]
    kwargs = dict(max_new_tokens=12, top_k=[1, 0, 5], top_p=[1.0, 0.9, 1.0], random_seed=[3, 4, 5],
                  return_log_probs=True)
    on = generate(model, prompts, use_cuda_graph=True, **kwargs)
    off = generate(model, prompts, use_cuda_graph=False, **kwargs)
    # the same packed shape again: the decode graph and its cache are reused, the prefill is now captured too
    # (second sight), then replayed; other prompts of the same packed shape replay that prefill graph
    graphed = [generate(model, prompts, use_cuda_graph=True, **kwargs) for _ in range(2)]
    entry = model.graph_cache[(len(prompts), cache_capacity([3, 1, 4], 12, CFG.max_pos_seq_len))]
    assert len(entry.prefill_graphs) == 1
    for again in graphed:
        assert on.output_ids == off.output_ids == again.output_ids
        for a, b in zip(again.output_log_probs, off.output_log_probs):
            assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
    others = [[9, 8, 7], [5], [6, 6, 1, 2]]
    assert (generate(model, others, use_cuda_graph=True, **kwargs).output_ids
            == generate(model, others, use_cuda_graph=False, **kwargs).output_ids)


class _Replayed:
    """Stands in for a captured CUDA graph off a GPU: each replay runs the step's launches again, eagerly, and
    copies what it returns into the tensors the capture returned (a graph's static outputs)."""

    def __init__(self, step):
        self.step = step
        self.out = step()

    def replay(self):
        new = self.step()
        for static, fresh in zip(*((o,) if isinstance(o, torch.Tensor) else o for o in (self.out, new))):
            if static is not fresh:
                static.copy_(fresh)


def _eager_capture(step, device):
    replayed = _Replayed(step)
    return replayed, replayed.out


def _graphs_run_eagerly(monkeypatch):
    """capture_cuda_graph swapped for eager replays, decode graphs kept under their own keys: DecodeGraph's logic on
    any device."""
    import ftlab.generate as gen

    monkeypatch.setattr(gen, "capture_cuda_graph", _eager_capture)
    monkeypatch.setattr(gen, "decode_graph", lambda m, b, c: gen.lru_get(
        m.graph_cache, ("eager", b, c), lambda: gen.DecodeGraph(m, b, c), gen.MAX_GRAPHS_PER_MODEL))


class _FakeGraphContext:
    def __init__(self, graph):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("collecting", [True, False])
def test_capture_pauses_cycle_collection_and_restores_it(collecting, monkeypatch):
    # a collection inside a capture can destroy an older graph, which invalidates the capture: capture_cuda_graph
    # keeps the collector off while the stream captures (the warm-up runs with it as it was) and leaves it as it
    # found it, on an error too. Fake graph classes: the bookkeeping on any device
    import gc

    import ftlab.generate as gen

    monkeypatch.setattr(gen.torch.cuda, "CUDAGraph", lambda: "graph")
    monkeypatch.setattr(gen.torch.cuda, "graph", _FakeGraphContext)
    seen = []

    def step():
        seen.append(gc.isenabled())
        if len(seen) == 4:
            raise RuntimeError("capture failed")
        return len(seen)

    was = gc.isenabled()
    try:
        gc.enable() if collecting else gc.disable()
        assert gen.capture_cuda_graph(step, "cpu") == ("graph", 2)
        assert seen == [collecting, False] and gc.isenabled() == collecting
        with pytest.raises(RuntimeError, match="capture failed"):
            gen.capture_cuda_graph(step, "cpu")
        assert seen[2:] == [collecting, False] and gc.isenabled() == collecting
    finally:
        gc.enable() if was else gc.disable()


@pytest.mark.parametrize("prefill_first,token_graph,early", [("0", "1", "1"), ("1", "1", "1"), ("1", "1", "0"),
                                                             ("1", "0", "1")])
def test_decode_graph_logic_runs_eagerly_like_the_session(prefill_first, token_graph, early, model, monkeypatch):
    # DecodeGraph's own logic (its step starts from the x that the prefill or the previous step wrote, the greedy
    # variant's one fused launch, lazily captured variants with the call's state put back, replayed prefills) on
    # any device: capture_cuda_graph swapped for eager replays. Calls alternate between the variants on one shape.
    # FTLAB_PREFILL_FIRST=1: the context phase launched before the parameters are loaded, the first token after;
    # FTLAB_EARLY_PREFILL=1 (with it): launched even before the parameters are checked (_open), else by LocalSession
    monkeypatch.setenv("FTLAB_PREFILL_FIRST", prefill_first)
    monkeypatch.setenv("FTLAB_FIRST_TOKEN_GRAPH", token_graph)  # =0: the first token sampled eagerly
    monkeypatch.setenv("FTLAB_EARLY_PREFILL", early)
    _graphs_run_eagerly(monkeypatch)
    prompts = [[1, 2, 3], [7], [4, 4, 4, 4]]
    end = generate(model, prompts, max_new_tokens=8, use_cuda_graph=False).generated_ids(1)[2]
    greedy = dict(max_new_tokens=8, return_log_probs=True, end_id=[60, end, 60])  # request 1 ends early
    sampled = dict(max_new_tokens=8, return_log_probs=True, top_k=[1, 0, 5], top_p=[1.0, 0.9, 1.0], random_seed=11)
    for kwargs in (greedy, sampled, greedy):
        on = generate(model, prompts, use_cuda_graph=True, **kwargs)
        off = generate(model, prompts, use_cuda_graph=False, **kwargs)
        assert on.output_ids == off.output_ids
        for a, b in zip(on.output_log_probs, off.output_log_probs):
            assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
    assert on.output_ids[1][-1] == end and len(on.output_ids[1]) <= 1 + 3  # stopped at its end_id, included
    entry = model.graph_cache.pop(("eager", 3, cache_capacity([3, 1, 4], 8, CFG.max_pos_seq_len)))
    assert sorted(entry.variants) == [False, True] and len(entry.prefill_graphs) == 1
    assert [len(k) == 3 for k in entry.prefill_graphs] == [prefill_first == "1"]  # (tokens, longest, "prefill only")
    # with the parameters loaded after the prefill, the first token has a graph of its own beside the prefill's
    assert [g.token_graph is not None for g in entry.prefill_graphs.values()] == [prefill_first == "1"]
    assert list(entry.host_rows_kept) == [(8, True)]  # the three calls read their rows through one set of buffers
    # other prompts of the same packed shape replay the captured prefill with their own tokens
    others = [[9, 8, 7], [5], [6, 6, 1, 2]]
    again = [generate(model, others, use_cuda_graph=True, **sampled) for _ in range(2)]
    off = generate(model, others, use_cuda_graph=False, **sampled)
    assert again[0].output_ids == again[1].output_ids == off.output_ids
    # prompts that fill the position table: the capture's warm-up step embeds one position past it
    full = [[5] * (CFG.max_pos_seq_len - 1)]
    for n in (1, 1):
        assert (generate(model, full, max_new_tokens=n, use_cuda_graph=True).output_ids
                == generate(model, full, max_new_tokens=n, use_cuda_graph=False).output_ids)
    model.graph_cache.clear()


def test_bad_parameters_after_an_early_prefill_fail_alone(model, monkeypatch):
    # a graph call's context phase is launched before its parameters are checked (ftlab.generate._launch_early): a
    # call whose parameters then fail has filled the graph's cache for nothing, and the next calls on that graph
    # still give what the eager path gives
    import ftlab.generate as gen

    monkeypatch.setenv("FTLAB_PREFILL_FIRST", "1")
    monkeypatch.setenv("FTLAB_EARLY_PREFILL", "1")
    _graphs_run_eagerly(monkeypatch)
    launches = []
    launch_prefill = gen.DecodeGraph.launch_prefill
    monkeypatch.setattr(gen.DecodeGraph, "launch_prefill",
                        lambda self, packed: launches.append(packed) or launch_prefill(self, packed))
    prompts, others = [[1, 2, 3], [7], [4, 4, 4, 4]], [[9, 8, 7], [5], [6, 6, 1, 2]]
    kwargs = dict(max_new_tokens=6, top_k=[1, 0, 5], random_seed=5, return_log_probs=True)
    generate(model, prompts, use_cuda_graph=True, **kwargs)
    with pytest.raises(GenerationError, match=r"top_p\[1\] = 1.5"):
        generate(model, others, use_cuda_graph=True, **dict(kwargs, top_p=[1.0, 1.5, 1.0]))
    assert len(launches) == 2  # the failing call's prefill was launched before its parameters were checked
    for batch in (prompts, others):
        on = generate(model, batch, use_cuda_graph=True, **kwargs)
        off = generate(model, batch, use_cuda_graph=False, **kwargs)
        assert on.output_ids == off.output_ids
        for a, b in zip(on.output_log_probs, off.output_log_probs):
            assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
    assert len(launches) == 4
    # logits processors keep the call off the graph: nothing is launched early for it
    generate(model, prompts, use_cuda_graph=True, max_new_tokens=3, repetition_penalty=1.2)
    assert len(launches) == 4
    model.graph_cache.clear()


@pytest.mark.parametrize("params, surely", [
    ({}, True), (dict(top_k=5, top_p=0.9, end_id=3), True), (dict(repetition_penalty=1.0, presence_penalty=0,
                                                                    min_length=0, stop_words=None), True),
    (dict(repetition_penalty=1.2), False), (dict(presence_penalty=0.5), False), (dict(min_length=2), False),
    (dict(min_length=[0, 0]), False), (dict(stop_words=[[[3]]]), False), (dict(bad_words=[]), False),
    (dict(repetition_penalty=True), False), (dict(repetition_penalty=torch.tensor(1.0)), False),
])
def test_only_default_processor_parameters_launch_early(params, surely):
    from ftlab.generate import _surely_unprocessed

    assert _surely_unprocessed(params) is surely


@pytest.mark.gpu
def test_greedy_and_sampled_calls_share_a_graph_like_eager(model):
    # a DecodeGraph captures its all-greedy step (kernels/finish_step.py greedy_finish_step) and its general step
    # the first time a call needs each, in the middle of that call's set-up: calls alternating between them on one
    # shape must each give what the eager path gives
    prompts = [[1, 2, 3], [7], [4, 4, 4, 4]]
    greedy = dict(max_new_tokens=9, return_log_probs=True)
    sampled = dict(max_new_tokens=9, return_log_probs=True, top_k=[1, 0, 5], top_p=[1.0, 0.9, 1.0], random_seed=11)
    for kwargs in (sampled, greedy, sampled, greedy):
        on = generate(model, prompts, use_cuda_graph=True, **kwargs)
        off = generate(model, prompts, use_cuda_graph=False, **kwargs)
        assert on.output_ids == off.output_ids
        for a, b in zip(on.output_log_probs, off.output_log_probs):
            assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
    entry = model.graph_cache[(len(prompts), cache_capacity([3, 1, 4], 9, CFG.max_pos_seq_len))]
    assert sorted(entry.variants) == [False, True]


@pytest.mark.gpu
@pytest.mark.parametrize("prefill_first", ["0", "1"])
def test_cuda_graph_masks_finished_requests_like_eager(prefill_first, model, monkeypatch):
    monkeypatch.setenv("FTLAB_PREFILL_FIRST", prefill_first)
    # the captured step keeps the end-of-sequence bookkeeping itself (kernels/finish_step.py): per step the same
    # tokens, finished flags and log-probs as the torch ops of the eager path, also after a request has ended
    prompts = [[1, 2, 3], [7], [4, 4, 4, 4]]
    free = generate(model, prompts, max_new_tokens=10, use_cuda_graph=False)
    end = free.generated_ids(0)[3]  # request 0 ends with its 4th token (others maybe earlier or never)
    kwargs = dict(max_new_tokens=10, end_id=end, return_log_probs=True, sync_every=3)
    eager = [(s.token_ids, s.finished, s.log_probs) for s in stream(model, prompts, use_cuda_graph=False, **kwargs)]
    assert eager[3][1][0] and all(s[0][0] == end and s[2][0] == 0.0 for s in eager[3:])
    for _ in range(3):  # the third call also replays a captured prefill (second sight of the packed shape)
        graphed = [(s.token_ids, s.finished, s.log_probs) for s in stream(model, prompts, use_cuda_graph=True, **kwargs)]
        assert [g[:2] for g in graphed] == [e[:2] for e in eager]
        for g, e in zip(graphed, eager):
            assert g[2] == pytest.approx(e[2], rel=1e-5, abs=1e-6)


def test_cli_decoding_features(model_dir, capsys):
    base = ["generate", "-m", str(model_dir), "--input-ids", "1,2,3", "--max-new-tokens", "6", "--json"]
    assert main(base + ["--return-log-probs"]) == 0
    free = json.loads(capsys.readouterr().out)
    generated = free["output_ids"][0][3:]
    assert len(free["output_log_probs"][0]) == len(generated)
    assert free["cum_log_probs"][0] == pytest.approx(sum(free["output_log_probs"][0]))
    # banning the first generated token changes it; a stop word made of the first two ends the request there
    assert main(base + ["--bad-words", str(generated[0])]) == 0
    assert json.loads(capsys.readouterr().out)["output_ids"][0][3] != generated[0]
    if len(generated) >= 3:
        assert main(base + ["--stop-words", f"{generated[0]},{generated[1]}"]) == 0
        assert json.loads(capsys.readouterr().out)["output_ids"][0] == [1, 2, 3] + generated[:2]
    assert main(base + ["--beam-width", "3", "--len-penalty", "0.8"]) == 0
    beams = json.loads(capsys.readouterr().out)
    assert len(beams["beams"][0]) == 3 and beams["beams"][0][0] == beams["output_ids"][0]
    assert main(base + ["--repetition-penalty", "0"]) == 2
    assert "repetition_penalty" in capsys.readouterr().err



def test_lru_get_makes_once_and_drops_the_least_recently_used():
    made, cache = [], {}

    def make(key):
        made.append(key)
        return f"graph {key}"

    for key in (1, 2, 1, 3, 2, 4):
        assert lru_get(cache, key, lambda key=key: make(key), limit=3) == f"graph {key}"
    assert made == [1, 2, 3, 4]  # hits make nothing
    assert list(cache) == [3, 2, 4]  # 1 was the least recently used when 4 came


def test_prompts_may_be_tuples_arrays_or_tensors(model):
    import numpy as np

    as_lists = generate(model, [[1, 2, 3], [4]], max_new_tokens=3)
    mixed = generate(model, [(1, 2, 3), np.array([4], dtype=np.int32)], max_new_tokens=3)
    tensors = generate(model, [torch.tensor([1, 2, 3]), torch.tensor([4])], max_new_tokens=3)
    assert mixed.output_ids == as_lists.output_ids == tensors.output_ids
    assert all(type(t) is int for ids in mixed.output_ids for t in ids)  # JSON-ready
    # a (B, T) batch of input ids in one array or tensor, as HF / FasterTransformer take them (and ftlab bench)
    rows = [[5, 1, 2, 3], [4, 4, 0, 7]]
    from_rows = generate(model, rows, max_new_tokens=3)
    for batch in (np.array(rows), np.array(rows, dtype=np.int32), torch.tensor(rows)):
        out = generate(model, batch, max_new_tokens=3)
        assert out.output_ids == from_rows.output_ids
        assert all(type(t) is int for ids in out.output_ids for t in ids)


def test_packed_prompts_hold_ids_and_positions():
    # ragged lists, ragged int32 arrays, rows of one (B, T) array and equal-length lists (the uniform-length path,
    # whose positions and boundaries come from a cache per shape and must not be writable)
    for prompts in ([[5, 1, 2], [7], [3, 4]], [np.array([5, 1], np.int32), np.array([7, 9, 2], np.int32)],
                    list(np.arange(12).reshape(3, 4) * 7), [[9, 8, 7, 6], [1, 2, 3, 4], [0, 0, 5, 1]], [[3]]):
        packed = pack_prompts_host(prompts)
        assert packed.token_ids.dtype == np.int64 and packed.token_ids.tolist() == [int(t) for p in prompts for t in p]
        assert packed.positions.tolist() == [i for p in prompts for i in range(len(p))]
        assert packed.cu_seqlens.tolist() == np.cumsum([0] + [len(p) for p in prompts]).tolist()
        assert packed.lengths == [len(p) for p in prompts] and packed.total == sum(packed.lengths)
        if len(set(packed.lengths)) == 1:
            with pytest.raises(ValueError):
                packed.positions[0] = 1


def test_host_to_device_views_every_part_exactly(device):
    # mixed dtypes and odd sizes share one buffer (8-byte aligned parts); each view holds its values exactly
    seeds = [2**63 - 1, -(2**63), 12345]
    parts = host_to_device(device, top_k=([1, 0, 40], torch.int32), top_p=([0.9, 1.0, 0.25], torch.float32),
                           seeds=(seeds, torch.int64), empty=([], torch.int32),
                           ids=(np.arange(7, dtype=np.int64) * 3, torch.int64), one=([5], torch.int32))
    assert parts["top_k"].tolist() == [1, 0, 40] and parts["top_k"].dtype == torch.int32
    assert parts["top_p"].tolist() == [torch.tensor(0.9).item(), 1.0, 0.25]
    assert parts["seeds"].tolist() == seeds and parts["ids"].tolist() == [3 * i for i in range(7)]
    assert parts["empty"].numel() == 0 and parts["one"].tolist() == [5]
    assert all(t.device.type == torch.device(device).type for t in parts.values())


@pytest.mark.parametrize("staged", [False, True])
def test_device_columns_reload_scalars_arrays_and_bad_sizes(device, staged):
    # the same columns loaded again and again (a captured graph's inputs): lists, tuples, 2-D arrays (flattened),
    # scalars (fill the column); a wrong count or wrong names fail naming the column and leave the last load intact
    cols = DeviceColumns(device, pinned_staging=staged, k=(3, torch.int32), p=(3, torch.float32),
                         ids=(6, torch.int64), done=(3, torch.bool))
    rng = np.random.default_rng(7)
    for _ in range(3):
        ids = rng.integers(-2**40, 2**40, size=(2, 3))
        k, p = rng.integers(0, 50, size=3).tolist(), tuple(rng.random(3).astype(np.float32).tolist())
        done = bool(rng.integers(0, 2))
        views = cols.load(k=k, p=p, ids=ids, done=done)
        assert views["k"].tolist() == k and views["p"].tolist() == list(p)
        assert views["ids"].tolist() == ids.reshape(-1).tolist() and views["done"].tolist() == [done] * 3
    views = cols.load(k=7, p=np.float32(0.5), ids=np.arange(6), done=[True, False, True])
    assert views["k"].tolist() == [7] * 3 and views["p"].tolist() == [0.5] * 3
    assert views["done"].tolist() == [True, False, True]
    # equal entries (filled from one value) and lists that differ only in their last or first entry
    for k in ([5, 5, 5], [5, 5, 6], [6, 5, 5], (9, 9, 9)):
        assert cols.load(k=k, p=[0.25] * 3, ids=np.arange(6), done=False)["k"].tolist() == list(k)
    with pytest.raises(ValueError, match="'k' has 2 values, expected 3"):
        cols.load(k=[1, 2], p=0.5, ids=np.arange(6), done=False)
    with pytest.raises(ValueError, match="'ids' has 5 values, expected 6"):
        cols.load(k=1, p=0.5, ids=np.arange(5), done=False)
    with pytest.raises(KeyError, match="expected"):
        cols.load(k=1, p=0.5, ids=np.arange(6))
    assert cols.views["ids"].tolist() == list(range(6))  # the last good load, not the failed ones
