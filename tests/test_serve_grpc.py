"""The server's gRPC side, driven by tritonclient.grpc: infer, FT's decoupled streaming, errors, metadata."""
import queue

import numpy as np
import pytest
import torch

from ftlab.checkpoint import random_ft_tensors
from ftlab.config import GPTConfig
from ftlab.generate import generate
from ftlab.model import GPT
from ftlab.serve import InferenceServer

grpcclient = pytest.importorskip("tritonclient.grpc")  # the GPU image has no tritonclient: skipped there
InferenceServerException = pytest.importorskip("tritonclient.utils").InferenceServerException

CFG = GPTConfig(head_num=4, size_per_head=8, num_layer=1, vocab_size=61, max_pos_seq_len=48, start_id=0, end_id=60)
MODEL = "fastertransformer"
PROMPTS = [[3, 14, 15, 9, 2], [6], [5, 35, 8]]


@pytest.fixture(scope="module")
def model():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return GPT.from_ft_tensors(CFG, random_ft_tensors(CFG, seed=3, std=0.5), dtype="fp32", device=device)


@pytest.fixture(scope="module")
def server(model):
    with InferenceServer(model, port=0, grpc_port=0, max_batch_size=8, max_queue_delay_us=100_000) as srv:
        yield srv


@pytest.fixture
def client(server):
    c = grpcclient.InferenceServerClient(server.grpc_url)
    yield c
    c.close()


def _inputs(prompts, out_len, **per_sequence):
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), CFG.end_id, dtype=np.uint32)
    for b, p in enumerate(prompts):
        ids[b, :len(p)] = p
    tensors = {"input_ids": ids, "input_lengths": np.array([[len(p)] for p in prompts], dtype=np.uint32),
               "request_output_len": np.full((len(prompts), 1), out_len, dtype=np.uint32)}
    tensors.update(per_sequence)
    inputs = []
    for name, array in tensors.items():
        datatype = {np.uint32: "UINT32", np.float32: "FP32", np.uint64: "UINT64"}[array.dtype.type]
        t = grpcclient.InferInput(name, list(array.shape), datatype)
        t.set_data_from_numpy(array)
        inputs.append(t)
    return inputs


def test_infer_ragged_batch_equals_generate(client, model):
    result = client.infer(MODEL, _inputs(PROMPTS, 4))
    ids, lengths = result.as_numpy("output_ids"), result.as_numpy("sequence_length")
    want = generate(model, PROMPTS, max_new_tokens=4)
    assert ids.dtype == np.uint32 and ids.shape == (3, 1, max(want.sequence_length))
    assert lengths.tolist() == [[n] for n in want.sequence_length]
    for b, seq in enumerate(want.output_ids):
        assert ids[b, 0, :len(seq)].tolist() == seq


def test_sampling_and_log_probs_equal_generate(client, model):
    top_k = np.array([[0], [5], [1]], dtype=np.uint32)
    top_p = np.array([[0.9], [1.0], [1.0]], dtype=np.float32)
    seeds = np.array([[11], [12], [13]], dtype=np.uint64)
    outputs = [grpcclient.InferRequestedOutput(n) for n in ("output_ids", "output_log_probs")]
    result = client.infer(MODEL, _inputs(PROMPTS, 5, runtime_top_k=top_k, runtime_top_p=top_p, random_seed=seeds),
                          outputs=outputs)
    want = generate(model, PROMPTS, max_new_tokens=5, top_k=[0, 5, 1], top_p=[0.9, 1.0, 1.0],
                    random_seed=[11, 12, 13], return_log_probs=True)
    assert result.as_numpy("sequence_length") is None  # only the requested outputs come back
    for b, seq in enumerate(want.output_ids):
        assert result.as_numpy("output_ids")[b, 0, :len(seq)].tolist() == seq
        np.testing.assert_allclose(result.as_numpy("output_log_probs")[b, 0, :5], want.output_log_probs[b],
                                   rtol=1e-5, atol=1e-6)


def test_stream_one_response_per_token_ending_with_the_infer_result(client, server):
    want = client.infer(MODEL, _inputs(PROMPTS, 4, runtime_top_k=np.full((3, 1), 3, dtype=np.uint32),
                                       random_seed=np.array([[1], [2], [3]], dtype=np.uint64)))
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    client.async_stream_infer(MODEL, _inputs(PROMPTS, 4, runtime_top_k=np.full((3, 1), 3, dtype=np.uint32),
                                             random_seed=np.array([[1], [2], [3]], dtype=np.uint64)),
                              request_id="r1", enable_empty_final_response=True)
    got = []
    while True:
        result, error = responses.get(timeout=120)
        assert error is None, error
        if result.get_response().parameters["triton_final_response"].bool_param:
            break
        got.append(result)
    client.stop_stream()
    assert len(got) == 4  # one per generated token
    lengths = [r.as_numpy("sequence_length")[:, 0].tolist() for r in got]
    assert lengths[0] == [len(p) + 1 for p in PROMPTS]
    assert lengths[-1] == want.as_numpy("sequence_length")[:, 0].tolist()
    assert all(r.get_response().id == "r1" for r in got)
    np.testing.assert_array_equal(got[-1].as_numpy("output_ids"), want.as_numpy("output_ids"))
    for earlier, later in zip(got, got[1:]):  # each response extends the previous one (padding aside)
        for b, n in enumerate(earlier.as_numpy("sequence_length")[:, 0]):
            assert later.as_numpy("output_ids")[b, 0, :n].tolist() == earlier.as_numpy("output_ids")[b, 0, :n].tolist()


def test_bad_requests_name_the_tensor_and_the_server_keeps_serving(client, server):
    bad_top_p = _inputs(PROMPTS[:1], 2, runtime_top_p=np.array([[1.5]], dtype=np.float32))
    with pytest.raises(InferenceServerException, match="input 'runtime_top_p': top_p") as info:
        client.infer(MODEL, bad_top_p)
    assert "INVALID_ARGUMENT" in str(info.value.status())
    missing = [t for t in _inputs(PROMPTS[:1], 2) if t.name() != "input_lengths"]
    with pytest.raises(InferenceServerException, match="input_lengths"):
        client.infer(MODEL, missing)
    with pytest.raises(InferenceServerException, match="unknown model 'gpt'"):
        client.infer("gpt", _inputs(PROMPTS[:1], 2))
    # on a stream the error is that request's response; the stream and the server go on
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    client.async_stream_infer(MODEL, bad_top_p)
    client.async_stream_infer(MODEL, _inputs(PROMPTS[:1], 1))
    first, second = responses.get(timeout=120), responses.get(timeout=120)
    client.stop_stream()
    assert first[0] is None and "top_p" in str(first[1])
    assert second[1] is None and second[0].as_numpy("sequence_length")[0, 0] == len(PROMPTS[0]) + 1
    assert client.infer(MODEL, _inputs(PROMPTS[:1], 1)).as_numpy("output_ids").shape[2] == len(PROMPTS[0]) + 1


def test_health_metadata_config_and_statistics(client, server):
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(MODEL)
    assert not client.is_model_ready("gpt")
    meta = client.get_model_metadata(MODEL, as_json=True)
    assert meta["name"] == MODEL and {t["name"] for t in meta["inputs"]} >= {"input_ids", "input_lengths"}
    config = client.get_model_config(MODEL, as_json=True)["config"]
    assert config["max_batch_size"] == 8 and config["model_transaction_policy"]["decoupled"]
    assert config["parameters"]["vocab_size"]["string_value"] == str(CFG.vocab_size)
    assert client.get_server_metadata(as_json=True)["name"] == "ftlab"
    assert client.get_model_repository_index(as_json=True)["models"][0]["state"] == "READY"
    stats = client.get_inference_statistics(MODEL, as_json=True)["model_stats"][0]
    assert int(stats["inference_count"]) >= 1
    with pytest.raises(InferenceServerException, match="unknown model"):
        client.get_model_metadata("gpt")


def test_cli_serves_grpc_beside_http(tmp_path, model):
    import subprocess
    import sys

    from ftlab.checkpoint import write_cmodel

    model_dir = write_cmodel(tmp_path, CFG, random_ft_tensors(CFG, seed=3, std=0.5), tensor_para_size=1)
    proc = subprocess.Popen([sys.executable, "-m", "ftlab", "serve", "-m", str(model_dir), "--port", "0",
                             "--grpc-port", "0", "--dtype", "fp32"], stderr=subprocess.PIPE, text=True)
    try:
        banner = proc.stderr.readline()  # ftlab serve: ... on http://HOST:PORT and grpc://HOST:PORT ...
        client = grpcclient.InferenceServerClient(banner.split("grpc://")[1].split()[0])
        ids = client.infer(MODEL, _inputs([[5, 6]], 2)).as_numpy("output_ids")
        assert ids[0, 0].tolist() == generate(model, [[5, 6]], max_new_tokens=2).output_ids[0]
        client.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
