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
