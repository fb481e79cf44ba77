import pytest
import torch

from ftlab.kernels.finish_step import finish_step, finish_step_reference


def _state(B, rows, device, vocab=50):
    sampled = torch.randint(0, vocab, (B,))
    end_id = torch.randint(0, vocab, (B,))
    hit = torch.rand(B) < 0.3
    sampled[hit] = end_id[hit]  # some requests sample their end token this step
    finished = torch.rand(B) < 0.4
    steps = torch.randint(0, rows + 2, (B,), dtype=torch.int32)  # a few beyond the history: not written
    steps[0] = 0
    return dict(sampled=sampled.to(device), sampled_log_probs=(-5 * torch.rand(B)).to(device),
                end_id=end_id.to(device), finished=finished.to(device), steps=steps.to(device),
                positions=torch.randint(1, 900, (B,), dtype=torch.int32).to(device))


@pytest.mark.parametrize("with_positions", [True, False])
@pytest.mark.parametrize("B", [1, 7, 13, 1030])
def test_finish_step_matches_reference(B, with_positions, device):
    rows = 9
    s = _state(B, rows, device)
    positions = s["positions"].clone() if with_positions else None
    ref_token, ref_lp, ref_done, ref_row, ref_steps, ref_pos = finish_step_reference(
        s["sampled"], s["sampled_log_probs"], s["end_id"], s["finished"], s["steps"], rows, positions)
    hist = (torch.full((rows, B), -7, dtype=torch.int64, device=device),
            torch.full((rows, B), 3.5, dtype=torch.float32, device=device),
            torch.zeros((rows, B), dtype=torch.bool, device=device))
    untouched = [h.clone() for h in hist]
    finished, steps, log_probs = s["finished"].clone(), s["steps"].clone(), s["sampled_log_probs"].clone()
    next_tokens = torch.full((B,), -1, dtype=torch.int64, device=device)
    finish_step(s["sampled"], log_probs, s["end_id"], finished, next_tokens, steps, *hist, positions=positions)
    assert torch.equal(next_tokens, ref_token) and torch.equal(finished, ref_done)
    assert torch.equal(log_probs, ref_lp) and torch.equal(steps, ref_steps)
    if with_positions:
        assert torch.equal(positions, ref_pos)
    for b, row in enumerate(ref_row):
        for h, before, want in zip(hist, untouched, (ref_token, ref_lp, ref_done)):
            if row is None:  # outside the history: that column is left as it was
                assert torch.equal(h[:, b], before[:, b])
            else:
                assert h[row, b] == want[b]
                others = [r for r in range(rows) if r != row]
                assert torch.equal(h[others, b], before[others, b])
    # what generate() relies on: a finished request emits end_id with log-prob 0 and stays finished
    was = s["finished"]
    assert torch.equal(next_tokens[was], s["end_id"][was]) and bool((log_probs[was] == 0).all())
    assert bool(finished[was].all())


def test_finish_step_names_the_bad_tensor(device):
    s = _state(4, 3, device)
    hist = (torch.zeros((3, 4), dtype=torch.int64, device=device), torch.zeros((3, 4), device=device),
            torch.zeros((3, 4), dtype=torch.bool, device=device))
    with pytest.raises(ValueError, match="steps must be a contiguous torch.int32"):
        finish_step(s["sampled"], s["sampled_log_probs"], s["end_id"], s["finished"], s["sampled"].clone(),
                    s["steps"].long(), *hist)
    with pytest.raises(ValueError, match="hist_finished"):
        finish_step(s["sampled"], s["sampled_log_probs"], s["end_id"], s["finished"], s["sampled"].clone(),
                    s["steps"], hist[0], hist[1], hist[2][:2])


def _greedy_logits(B, V, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, V, generator=g) * 3
    for b in range(B):  # exact ties for the maximum, some of them in other chunks: the lowest index must win
        at = torch.randint(0, V, (3,), generator=g)
        logits[b, at] = logits[b].max() + 1
    if V > 4:
        logits[:, 1] = float("-inf")
    return logits.to(dtype).to(device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,V,chunk", [(1, 1, None), (7, 13, None), (5, 1023, 64), (3, 5000, 512), (2, 50257, None)])
def test_greedy_finish_step_is_sample_then_finish_step(B, V, chunk, dtype, device):
    from ftlab.kernels.finish_step import greedy_finish_step, greedy_finish_step_reference
    from ftlab.kernels.sampling import sample

    rows = 9
    s = _state(B, rows, device, vocab=max(V, 2))
    logits = _greedy_logits(B, V, dtype, device, seed=B * 1000 + V)
    ones = torch.ones(B, dtype=torch.int32, device=device)
    sampled, sampled_lp = sample(logits, ones, torch.ones(B, device=device), torch.full((B,), 0.7, device=device),
                                 torch.zeros(B, dtype=torch.int64, device=device), s["steps"], return_logprobs=True)
    want = dict(finished=s["finished"].clone(), steps=s["steps"].clone(), positions=s["positions"].clone(),
                next=torch.full((B,), -1, dtype=torch.int64, device=device), lp=sampled_lp.clone(),
                hist=(torch.full((rows, B), -7, dtype=torch.int64, device=device),
                      torch.full((rows, B), 3.5, dtype=torch.float32, device=device),
                      torch.zeros((rows, B), dtype=torch.bool, device=device)))
    got = {k: (tuple(h.clone() for h in v) if k == "hist" else v.clone()) for k, v in want.items()}
    got["lp"].fill_(123.0)
    finish_step(sampled, want["lp"], s["end_id"], want["finished"], want["next"], want["steps"], *want["hist"],
                positions=want["positions"])
    counter = torch.zeros(B, dtype=torch.int32, device=device)
    for _ in range(2):  # the counter is left zero: a second call over the same state behaves the same
        for k in ("finished", "steps", "positions"):
            got[k].copy_(s[k])
        greedy_finish_step(logits, s["end_id"], got["finished"], got["next"], got["lp"], got["steps"], *got["hist"],
                           positions=got["positions"], counter=counter, chunk=chunk)
        assert torch.equal(counter, torch.zeros_like(counter))
        assert torch.equal(got["next"], want["next"]) and torch.equal(got["finished"], want["finished"])
        assert torch.equal(got["steps"], want["steps"]) and torch.equal(got["positions"], want["positions"])
        torch.testing.assert_close(got["lp"], want["lp"], rtol=1e-5, atol=1e-5)
        assert torch.equal(got["hist"][0], want["hist"][0]) and torch.equal(got["hist"][2], want["hist"][2])
        torch.testing.assert_close(got["hist"][1], want["hist"][1], rtol=1e-5, atol=1e-5)
    # and the torch reference (the first of equal maxima, log_softmax in fp32)
    ref_token, ref_lp, ref_done, _, ref_steps, ref_pos = greedy_finish_step_reference(
        logits, s["end_id"], s["finished"], s["steps"], rows, s["positions"])
    assert torch.equal(got["next"], ref_token) and torch.equal(got["finished"], ref_done)
    assert torch.equal(got["steps"], ref_steps) and torch.equal(got["positions"], ref_pos)
    torch.testing.assert_close(got["lp"], ref_lp, rtol=1e-5, atol=1e-5)


def test_greedy_finish_step_names_the_bad_tensor(device):
    from ftlab.kernels.finish_step import greedy_finish_step

    s = _state(4, 3, device)
    hist = (torch.zeros((3, 4), dtype=torch.int64, device=device), torch.zeros((3, 4), device=device),
            torch.zeros((3, 4), dtype=torch.bool, device=device))
    logits = torch.randn(4, 10, device=device)
    lp = torch.zeros(4, device=device)
    with pytest.raises(ValueError, match="counter must be a contiguous torch.int32"):
        greedy_finish_step(logits, s["end_id"], s["finished"], s["sampled"].clone(), lp, s["steps"], *hist,
                           counter=torch.zeros(4, dtype=torch.int64, device=device))
    with pytest.raises(ValueError, match="logits must be 2-D"):
        greedy_finish_step(logits[0], s["end_id"], s["finished"], s["sampled"].clone(), lp, s["steps"], *hist)
    with pytest.raises(ValueError, match="chunk must be a power of two"):
        greedy_finish_step(logits, s["end_id"], s["finished"], s["sampled"].clone(), lp, s["steps"], *hist, chunk=24)


@pytest.mark.parametrize("H", [7, 64, 1100])
def test_greedy_finish_step_embeds_the_next_input(H, device):
    # embed=(wte, wpe, x): x[b] = wte[emitted token] + wpe[position after the update], finished requests included
    # (they emit end_id), in x's dtype: what the next decode step would compute with kernels/embedding.py
    from ftlab.kernels.embedding import embedding_reference
    from ftlab.kernels.finish_step import greedy_finish_step

    B, V, P, rows = 5, 300, 50, 4
    s = _state(B, rows, device, vocab=V)
    positions = torch.randint(0, P - 1, (B,), dtype=torch.int32, device=device)
    positions[0] = P - 1  # its next position is past wpe: the last row is read (kernels/embedding.py does the same)
    logits = _greedy_logits(B, V, torch.float32, device, seed=H)
    wte = torch.randn(V, H, device=device)
    wpe = torch.randn(P, H, device=device)
    x = torch.full((B, H), 9.0, dtype=torch.float16, device=device)
    hist = (torch.zeros((rows, B), dtype=torch.int64, device=device), torch.zeros((rows, B), device=device),
            torch.zeros((rows, B), dtype=torch.bool, device=device))
    tokens = torch.zeros(B, dtype=torch.int64, device=device)
    greedy_finish_step(logits, s["end_id"], s["finished"].clone(), tokens, torch.zeros(B, device=device),
                       s["steps"].clone(), *hist, positions=positions, chunk=64, embed=(wte, wpe, x))
    assert int(positions[0]) == P
    assert torch.equal(x, embedding_reference(tokens, positions.clamp(max=P - 1), wte, wpe, torch.float16))
    with pytest.raises(ValueError, match="embed needs positions"):
        greedy_finish_step(logits, s["end_id"], s["finished"].clone(), tokens, torch.zeros(B, device=device),
                           s["steps"].clone(), *hist, embed=(wte, wpe, x))
