"""The Triton-protocol server, driven by tritonclient.http (what FT's Triton clients use) and raw HTTP."""
import json
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

from ftlab.checkpoint import random_ft_tensors
from ftlab.config import GPTConfig
from ftlab.generate import generate
from ftlab.model import GPT
from ftlab.serve import InferenceServer

# the dev extra installs tritonclient; an image without it (the GPU machine has no internet) skips these tests
httpclient = pytest.importorskip("tritonclient.http")
InferenceServerException = pytest.importorskip("tritonclient.utils").InferenceServerException

CFG = GPTConfig(head_num=4, size_per_head=8, num_layer=1, vocab_size=61, max_pos_seq_len=48, start_id=0, end_id=60)
MODEL = "fastertransformer"


@pytest.fixture(scope="module")
def model():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return GPT.from_ft_tensors(CFG, random_ft_tensors(CFG, seed=3, std=0.5), dtype="fp32", device=device)


@pytest.fixture(scope="module")
def server(model):
    with InferenceServer(model, port=0, max_batch_size=8, max_queue_delay_us=100_000) as srv:
        yield srv


@pytest.fixture
def client(server):
    c = httpclient.InferenceServerClient(server.url, concurrency=4)
    yield c
    c.close()


def _tensor(name, array, binary=True):
    datatype = {np.uint32: "UINT32", np.float32: "FP32", np.uint64: "UINT64", np.int32: "INT32",
                np.bool_: "BOOL"}[array.dtype.type]
    t = httpclient.InferInput(name, list(array.shape), datatype)
    t.set_data_from_numpy(array, binary_data=binary)
    return t


def _request(prompts, out_len, binary=True, **per_sequence):
    """FT's tensors for ragged prompts: input_ids right-padded with the end id, per-sequence values as [B, 1]."""
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), CFG.end_id, dtype=np.uint32)
    for b, p in enumerate(prompts):
        ids[b, :len(p)] = p
    column = lambda values, dtype: np.array(values, dtype=dtype).reshape(-1, 1)  # noqa: E731
    inputs = [_tensor("input_ids", ids, binary),
              _tensor("input_lengths", column([len(p) for p in prompts], np.uint32), binary),
              _tensor("request_output_len", column(out_len if isinstance(out_len, list) else [out_len] * len(prompts),
                                                   np.uint32), binary)]
    for name, (values, dtype) in per_sequence.items():
        array = values if isinstance(values, np.ndarray) else column(values, dtype)
        inputs.append(_tensor(name, array, binary))
    return inputs


PROMPTS = [[3, 14, 15, 9, 2], [6], [5, 35, 8]]


@pytest.mark.parametrize("binary", [True, False])
def test_greedy_ragged_batch_equals_generate(client, model, binary):
    outputs = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in ("output_ids", "sequence_length")]
    result = client.infer(MODEL, _request(PROMPTS, 4, binary), outputs=outputs)
    ids, lengths = result.as_numpy("output_ids"), result.as_numpy("sequence_length")
    want = generate(model, PROMPTS, max_new_tokens=4)
    assert ids.dtype == np.uint32 and ids.shape == (3, 1, max(want.sequence_length))
    assert lengths.tolist() == [[n] for n in want.sequence_length]
    for b, seq in enumerate(want.output_ids):
        assert ids[b, 0, :len(seq)].tolist() == seq
        assert (ids[b, 0, len(seq):] == CFG.end_id).all()


def test_health_metadata_and_config(client, server):
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(MODEL)
    meta = client.get_model_metadata(MODEL)
    assert {t["name"] for t in meta["inputs"]} >= {"input_ids", "input_lengths", "request_output_len",
                                                   "runtime_top_k", "runtime_top_p", "random_seed"}
    assert [t["name"] for t in meta["outputs"]][:2] == ["output_ids", "sequence_length"]
    config = client.get_model_config(MODEL)
    assert config["max_batch_size"] == 8 and config["parameters"]["vocab_size"]["string_value"] == "61"
    assert config["parameters"]["pipeline_para_size"]["string_value"] == "1"
    assert not client.is_model_ready("gpt-other")
    with urllib.request.urlopen(f"http://{server.url}/v2/models/{MODEL}/stats", timeout=60) as response:
        stats = json.loads(response.read())["model_stats"][0]
    assert stats["name"] == MODEL and set(stats) >= {"requests", "batches", "failed", "rejected"}


def test_per_sequence_sampling_parameters_and_log_probs(client, model):
    top_k, top_p, temperature, seeds = [1, 5, 0], [0.0, 0.9, 0.8], [1.0, 0.7, 1.3], [0, 7, 2**63 + 5]
    inputs = _request(PROMPTS, [3, 5, 2], runtime_top_k=(top_k, np.uint32), runtime_top_p=(top_p, np.float32),
                      temperature=(temperature, np.float32), random_seed=(seeds, np.uint64),
                      is_return_log_probs=([True] * 3, np.bool_))
    result = client.infer(MODEL, inputs)
    # FT's conventions: top_p = 0 is no nucleus limit
    want = generate(model, PROMPTS, max_new_tokens=5, top_k=top_k, top_p=[1.0, 0.9, 0.8],
                    temperature=[float(np.float32(t)) for t in temperature], random_seed=seeds, return_log_probs=True)
    ids, log_probs = result.as_numpy("output_ids"), result.as_numpy("output_log_probs")
    for b, (seq, n) in enumerate(zip(want.output_ids, [3, 5, 2])):
        kept = seq[:len(PROMPTS[b]) + n]
        assert ids[b, 0, :len(kept)].tolist() == kept
        np.testing.assert_allclose(log_probs[b, 0, :n], want.output_log_probs[b][:n], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(result.as_numpy("cum_log_probs")[b, 0], sum(want.output_log_probs[b][:n]),
                                   rtol=1e-5)


def test_concurrent_requests_are_batched_and_answered_as_alone(client, server, model):
    prompts = [[[1 + i, 2 + i]] for i in range(3)] + [[[7, 7, 7], [9]]]
    seeds = [[11 * i + 1] * len(p) for i, p in enumerate(prompts)]
    batches_before = server.stats["batches"]
    pending = [client.async_infer(MODEL, _request(p, 3, runtime_top_k=([4] * len(p), np.uint32),
                                                  random_seed=(s, np.uint64)))
               for p, s in zip(prompts, seeds)]
    results = [r.get_result() for r in pending]
    assert server.stats["batches"] - batches_before < len(prompts), "nothing was batched"
    for p, s, result in zip(prompts, seeds, results):
        want = generate(model, p, max_new_tokens=3, top_k=4, random_seed=s)
        for b, seq in enumerate(want.output_ids):
            assert result.as_numpy("output_ids")[b, 0, :len(seq)].tolist() == seq


def test_stop_and_bad_words_in_ft_layout(client, model):
    free = generate(model, [PROMPTS[0]], max_new_tokens=4).output_ids[0][len(PROMPTS[0]):]
    # stop at the second generated token; ban the first one (FT layout: ids, then end offsets padded with -1)
    stop = np.array([[[free[1], 0], [1, -1]]], dtype=np.int32)
    bad = np.array([[[free[0]], [1]]], dtype=np.int32)
    for name, words, kw in (("stop_words_list", stop, "stop_words"), ("bad_words_list", bad, "bad_words")):
        result = client.infer(MODEL, _request([PROMPTS[0]], 4, **{name: (words, None)}))
        want = generate(model, [PROMPTS[0]], max_new_tokens=4, **{kw: words})
        seq = want.output_ids[0]
        assert result.as_numpy("output_ids")[0, 0, :len(seq)].tolist() == seq
        assert result.as_numpy("sequence_length")[0, 0] == len(seq)


def test_beam_search(client, model):
    result = client.infer(MODEL, _request(PROMPTS[:2], 3, beam_width=([3, 3], np.uint32),
                                          len_penalty=([0.5, 0.5], np.float32), is_return_log_probs=([1, 1], np.bool_)))
    want = generate(model, PROMPTS[:2], max_new_tokens=3, beam_width=3, len_penalty=0.5)
    ids, lengths = result.as_numpy("output_ids"), result.as_numpy("sequence_length")
    assert ids.shape[:2] == (2, 3) and lengths.shape == (2, 3)
    for b in range(2):
        for k, hyp in enumerate(want.beams[b]):
            assert ids[b, k, :len(hyp)].tolist() == hyp and lengths[b, k] == len(hyp)
        np.testing.assert_allclose(result.as_numpy("cum_log_probs")[b], want.beam_log_probs[b], rtol=1e-5)


BAD = [
    ("no input_lengths", lambda ins: [t for t in ins if t.name() != "input_lengths"], "input_lengths"),
    ("top_p > 1", lambda ins: ins + [_tensor("runtime_top_p", np.full((2, 1), 1.5, np.float32))], "top_p"),
    ("float ids", lambda ins: [_tensor("input_ids", np.ones((2, 3), np.float32))] + ins[1:], "input_ids"),
    ("length > width", lambda ins: [ins[0], _tensor("input_lengths", np.array([[2], [9]], np.uint32))] + ins[2:],
     "input_lengths"),
    ("too long", lambda ins: ins[:2] + [_tensor("request_output_len", np.array([[48], [1]], np.uint32))],
     "max_pos_seq_len"),
    ("unknown input", lambda ins: ins + [_tensor("top_k", np.ones((2, 1), np.uint32))], "unknown input"),
    ("beam widths differ", lambda ins: ins + [_tensor("beam_width", np.array([[2], [3]], np.uint32))], "beam_width"),
    ("bad word list", lambda ins: ins + [_tensor("bad_words_list", np.ones((2, 3), np.int32))], "bad_words_list"),
]


@pytest.mark.parametrize("what,mutate,match", BAD, ids=[b[0] for b in BAD])
def test_bad_request_fails_alone(client, model, what, mutate, match):
    good = _request([[1, 2, 3], [4]], 2)
    with pytest.raises(InferenceServerException, match=match):
        client.infer(MODEL, mutate(good))
    again = client.infer(MODEL, good).as_numpy("output_ids")  # the server goes on serving
    assert again[1, 0, :3].tolist() == generate(model, [[4]], max_new_tokens=2).output_ids[0]


def _post(server, path, body: bytes, headers=None):
    request = urllib.request.Request(f"http://{server.url}{path}", data=body, headers=headers or {}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_raw_http_errors(server):
    status, body = _post(server, "/v2/models/gpt-other/infer", b"{}")
    assert status == 404 and "fastertransformer" in json.loads(body)["error"]
    status, body = _post(server, f"/v2/models/{MODEL}/infer", b"{not json")
    assert status == 400 and "JSON" in json.loads(body)["error"]
    request = {"inputs": [{"name": "input_ids", "shape": [1, 2], "datatype": "UINT32", "data": [1, 2]},
                          {"name": "input_lengths", "shape": [1, 1], "datatype": "UINT32", "data": [2]},
                          {"name": "request_output_len", "shape": [1, 1], "datatype": "UINT32", "data": [2]}],
               "outputs": [{"name": "logits"}]}
    status, body = _post(server, f"/v2/models/{MODEL}/infer", json.dumps(request).encode())
    assert status == 400 and "logits" in json.loads(body)["error"]
    request["inputs"][0]["data"] = [1]
    status, body = _post(server, f"/v2/models/{MODEL}/infer", json.dumps(request).encode())
    assert status == 400 and "input_ids" in json.loads(body)["error"]


def test_generate_stream_sends_each_token(server, model):
    body = json.dumps({"input_ids": PROMPTS[0], "request_output_len": 4, "runtime_top_k": 3, "random_seed": 9})
    status, raw = _post(server, f"/v2/models/{MODEL}/generate_stream", body.encode())
    events = [json.loads(line[len("data: "):]) for line in raw.decode().split("\n\n") if line.startswith("data: ")]
    want = generate(model, [PROMPTS[0]], max_new_tokens=4, top_k=3, random_seed=9).generated_ids(0)
    assert status == 200 and [e["output_ids"][0] for e in events][:len(want)] == want
    assert [e["step"] for e in events] == list(range(len(events)))
    status, raw = _post(server, f"/v2/models/{MODEL}/generate_stream", json.dumps({"input_ids": []}).encode())
    assert status == 400


def test_server_arguments_are_checked(model):
    with pytest.raises(ValueError, match="max_batch_size"):
        InferenceServer(model, port=0, max_batch_size=0)


def test_cli_serves_a_cmodel(tmp_path, model):
    import subprocess
    import sys

    from ftlab.checkpoint import write_cmodel

    model_dir = write_cmodel(tmp_path, CFG, random_ft_tensors(CFG, seed=3, std=0.5), tensor_para_size=1)
    proc = subprocess.Popen([sys.executable, "-m", "ftlab", "serve", "-m", str(model_dir), "--port", "0",
                             "--model-name", "gpt", "--dtype", "fp32"], stderr=subprocess.PIPE, text=True)
    try:
        banner = proc.stderr.readline()  # ftlab serve: ... on http://127.0.0.1:PORT ...
        url = banner.split("http://")[1].split()[0]
        client = httpclient.InferenceServerClient(url)
        assert client.is_model_ready("gpt")
        ids = client.infer("gpt", _request([[5, 6]], 2)).as_numpy("output_ids")
        assert ids[0, 0].tolist() == generate(model, [[5, 6]], max_new_tokens=2).output_ids[0]
        client.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    bad = subprocess.run([sys.executable, "-m", "ftlab", "serve", "-m", str(model_dir), "--port", url.split(":")[1],
                           "--max-batch-size", "0"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "max_batch_size" in bad.stderr
    alone = subprocess.run([sys.executable, "-m", "ftlab", "serve", "-m", str(model_dir), "--layer-para-size", "2"],
                           capture_output=True, text=True, timeout=120)
    assert alone.returncode == 2 and "torchrun --nproc-per-node 2" in alone.stderr  # one process cannot split


def test_cli_serves_across_two_pipeline_stages(tmp_path):
    # torchrun -m ftlab serve --layer-para-size 2: rank 0 serves, rank 1 follows each call; answers equal one
    # process's, a request that generate() refuses (on both ranks) fails alone, and the ranks keep serving
    import os
    import signal
    import subprocess
    import sys
    import time

    from ftlab.checkpoint import write_cmodel

    config = CFG.replace(num_layer=2)
    tensors = random_ft_tensors(config, seed=4, std=0.5)
    model_dir = write_cmodel(tmp_path, config, tensors, tensor_para_size=1)
    one = GPT.from_ft_tensors(config, tensors, dtype="fp32", device="cpu")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                             "-m", "ftlab", "serve", "-m", str(model_dir), "--port", "0", "--dtype", "fp32",
                             "--device", "cpu", "--layer-para-size", "2", "--max-queue-delay-us", "200000"],
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline, banner = time.monotonic() + 120, ""
        while "ftlab serve:" not in banner and time.monotonic() < deadline and proc.poll() is None:
            banner = proc.stderr.readline()
        assert "2 ranks on http://" in banner, banner
        url = banner.split("http://")[1].split()[0]
        client = httpclient.InferenceServerClient(url, concurrency=2)
        parameters = client.get_model_config(MODEL)["parameters"]
        assert parameters["pipeline_para_size"]["string_value"] == "2"
        greedy = client.infer(MODEL, _request(PROMPTS, 4)).as_numpy("output_ids")
        for b, want in enumerate(generate(one, PROMPTS, max_new_tokens=4).output_ids):
            assert greedy[b, 0, :len(want)].tolist() == want
        # two sampling requests in flight at once: batched together, each answered as alone
        pending = [client.async_infer(MODEL, _request([p], 5, runtime_top_k=([k], np.uint32),
                                                      random_seed=([s], np.uint64)))
                   for p, k, s in ((PROMPTS[0], 5, 11), (PROMPTS[2], 0, 12))]
        for (p, k, s), future in zip(((PROMPTS[0], 5, 11), (PROMPTS[2], 0, 12)), pending):
            want = generate(one, [p], max_new_tokens=5, top_k=k, random_seed=s).output_ids[0]
            assert future.get_result().as_numpy("output_ids")[0, 0].tolist() == want
        beams = client.infer(MODEL, _request(PROMPTS[:2], 3, beam_width=([3, 3], np.uint32))).as_numpy("output_ids")
        for b, hyps in enumerate(generate(one, PROMPTS[:2], max_new_tokens=3, beam_width=3).beams):
            assert [beams[b, k, :len(h)].tolist() for k, h in enumerate(hyps)] == hyps
        with pytest.raises(InferenceServerException, match="2\\*beam_width <= vocab_size"):  # 40 passes the protocol
            client.infer(MODEL, _request(PROMPTS[:1], 3, beam_width=([40], np.uint32)))
        again = client.infer(MODEL, _request(PROMPTS[1:2], 4)).as_numpy("output_ids")
        assert again[0, 0].tolist() == generate(one, PROMPTS[1:2], max_new_tokens=4).output_ids[0]
        body = json.dumps({"input_ids": PROMPTS[0], "request_output_len": 4, "runtime_top_k": 3, "random_seed": 9})
        request = urllib.request.Request(f"http://{url}/v2/models/{MODEL}/generate_stream", data=body.encode())
        with urllib.request.urlopen(request, timeout=60) as response:
            raw = response.read().decode()
        events = [json.loads(line[len("data: "):]) for line in raw.split("\n\n") if line.startswith("data: ")]
        want = generate(one, [PROMPTS[0]], max_new_tokens=4, top_k=3, random_seed=9).generated_ids(0)
        assert [e["output_ids"][0] for e in events][:len(want)] == want
        client.close()
        assert proc.poll() is None  # still serving
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
