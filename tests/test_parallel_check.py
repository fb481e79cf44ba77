"""ftlab.parallel_check's comparison: errors against the reference, agreement with the same dtype's T=1 run."""
import torch

from ftlab.parallel_check import compare, main


def _save(path, logits, tokens, tp=1, pp=1, dtype="fp16"):
    torch.save(dict(tp=tp, pp=pp, dtype=dtype, config="tiny", logits=logits, tokens=tokens), path)
    return path


def test_compare_reports_errors_and_agreement(tmp_path):
    g = torch.Generator().manual_seed(0)
    ref_logits = [torch.randn(3, 11, generator=g), torch.randn(5, 11, generator=g)]
    noise = [0.01 * torch.randn(t.shape, generator=g) for t in ref_logits]
    ref = _save(tmp_path / "ref.pt", ref_logits, [[1, 2, 3]], dtype="fp32")
    single = _save(tmp_path / "t1.pt", [r + n for r, n in zip(ref_logits, noise)], [[1, 2, 3], [4, 5, 6]])
    flipped = [(r + n).clone() for r, n in zip(ref_logits, noise)]
    flipped[1][0] = -flipped[1][0]  # one position's argmax moves
    split = _save(tmp_path / "t2.pt", flipped, [[1, 2, 3], [4, 5, 7]], tp=2)
    rows = {r["run"]: r for r in compare(ref, [single, split])}
    expected = max(float(n.norm() / r.norm()) for r, n in zip(ref_logits, noise))
    assert abs(rows["t1.pt"]["logits_rel_err_max"] - expected) < 1e-6
    assert rows["t1.pt"]["argmax_agree"] == 1.0 and rows["t1.pt"]["greedy_seqs_equal_t1"] == "2/2"
    assert rows["t2.pt"]["argmax_agree"] == 7 / 8 and rows["t2.pt"]["positions"] == 8
    assert rows["t2.pt"]["greedy_seqs_equal_t1"] == "1/2" and rows["t2.pt"]["greedy_tokens_equal_t1"] == 5 / 6
    assert rows["t2.pt"]["logits_rel_diff_vs_t1"] > 0.5  # the negated row dominates


def test_compare_cli_writes_csv(tmp_path, capsys):
    logits = [torch.randn(2, 5)]
    ref = _save(tmp_path / "ref.pt", logits, [[0]], dtype="fp32")
    run = _save(tmp_path / "run.pt", logits, [[0]], tp=2, dtype="fp32")
    assert main(["compare", str(ref), str(run), "--csv", str(tmp_path / "c.csv")]) == 0
    assert "run.pt" in capsys.readouterr().out
    assert (tmp_path / "c.csv").read_text().startswith("run,config,dtype,tp,pp,logits_rel_err_max")
