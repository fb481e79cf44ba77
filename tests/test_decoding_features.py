"""FasterTransformer 5's decoding features against HF transformers' generate on the same weights (fp32, greedy):
repetition penalty, min_length, bad words, stop words and log-probs; plus presence penalty, FT's word-list layout,
per-request seeds and bad inputs."""
import pytest
import torch

from ftlab.generate import GenerationError, generate
from ftlab.processing import words_from_ft_layout
from tests.test_model_hf import CONFIGS, ftlab_model, random_hf_model, random_prompts

transformers = pytest.importorskip("transformers")
N_NEW = 10


@pytest.fixture(scope="module")
def models():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hf = random_hf_model(**CONFIGS[0], seed=5)
    return hf, ftlab_model(hf, "fp32", device)


@pytest.fixture(scope="module")
def prompts(models):
    """Two prompts whose greedy continuation runs the full N_NEW tokens (no early end token), so that words picked
    from it exist."""
    _, model = models
    for seed in range(20):
        torch.manual_seed(seed)
        candidates = random_prompts(53, [6, 3])
        free = generate(model, candidates, max_new_tokens=N_NEW)
        if all(len(free.generated_ids(b)) == N_NEW for b in range(2)):
            return candidates
    pytest.fail("no prompts without an early end token")


def hf_generate(hf, prompt, **kwargs):
    kwargs.setdefault("eos_token_id", hf.config.eos_token_id)
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          do_sample=False, max_new_tokens=N_NEW, pad_token_id=kwargs["eos_token_id"],
                          output_scores=True, return_dict_in_generate=True, **kwargs)
    log_probs = hf.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)[0]
    return out.sequences[0].tolist(), log_probs


@pytest.mark.parametrize("penalty", [1.0, 1.7, 0.6])
def test_repetition_penalty_and_log_probs_equal_hf(models, prompts, penalty):
    hf, model = models
    ours = generate(model, prompts, max_new_tokens=N_NEW, repetition_penalty=penalty, return_log_probs=True)
    for b, prompt in enumerate(prompts):
        ids, log_probs = hf_generate(hf, prompt, repetition_penalty=penalty)
        assert ours.output_ids[b] == ids
        torch.testing.assert_close(torch.tensor(ours.output_log_probs[b]), log_probs.float(), rtol=1e-4, atol=1e-4)
        assert ours.cum_log_probs[b] == pytest.approx(log_probs.sum().item(), rel=1e-4, abs=1e-4)


def test_min_length_equals_hf_min_new_tokens(models, prompts):
    hf, model = models
    free = generate(model, prompts[:1], max_new_tokens=N_NEW)
    early_end = free.generated_ids(0)[1]  # make the 2nd generated token the end token: it would stop at 2
    ours = generate(model, prompts[:1], max_new_tokens=N_NEW, end_id=early_end, min_length=5)
    ids, _ = hf_generate(hf, prompts[0], eos_token_id=early_end, min_new_tokens=5)
    assert ours.output_ids[0] == ids
    assert len(ours.generated_ids(0)) >= 5
    stop_at = free.generated_ids(0).index(early_end) + 1  # where it ends without min_length (1 or 2 tokens)
    assert generate(model, prompts[:1], max_new_tokens=N_NEW, end_id=early_end).generated_ids(0) == \
        free.generated_ids(0)[:stop_at]


def test_bad_words_equal_hf(models, prompts):
    hf, model = models
    free = generate(model, prompts, max_new_tokens=N_NEW)
    for b, prompt in enumerate(prompts):
        gen = free.generated_ids(b)
        bad = [[gen[1]], [gen[3], gen[4]]]  # one single-token word, one that bans gen[4] after gen[3]
        ours = generate(model, [prompt], max_new_tokens=N_NEW, bad_words=[bad])
        ids, _ = hf_generate(hf, prompt, bad_words_ids=bad)
        assert ours.output_ids[0] == ids
        assert gen[1] not in ours.generated_ids(0)


class _StopOnWords(transformers.StoppingCriteria):
    def __init__(self, words):
        self.words = words

    def __call__(self, input_ids, scores, **kwargs):
        return torch.tensor([any(row[-len(w):] == w for w in self.words) for row in input_ids.tolist()])


def test_stop_words_equal_hf(models, prompts):
    hf, model = models
    free = generate(model, prompts, max_new_tokens=N_NEW)
    stops = [[free.generated_ids(0)[2:4]], [free.generated_ids(1)[5:6], [52, 52, 52]]]
    ours = generate(model, prompts, max_new_tokens=N_NEW, stop_words=stops)
    for b, prompt in enumerate(prompts):
        ids, _ = hf_generate(hf, prompt, stopping_criteria=transformers.StoppingCriteriaList([_StopOnWords(stops[b])]))
        assert ours.output_ids[b] == ids
    for b, prompt in enumerate(prompts):  # each stops right after the first completed stop word, which is kept
        full = prompt + free.generated_ids(b)
        end = next(i for i in range(len(prompt) + 1, len(full) + 1)
                   if any(full[:i][-len(w):] == w for w in stops[b]))
        assert ours.output_ids[b] == full[:end]


def test_ft_word_list_layout(models, prompts):
    _, model = models
    # FT's [batch, 2, L]: request 0 bans words [7] and [8, 9]; request 1 has none (offsets all -1)
    packed = torch.tensor([[[7, 8, 9], [1, 3, -1]], [[0, 0, 0], [-1, -1, -1]]])
    assert words_from_ft_layout(packed) == [[[7], [8, 9]], []]
    a = generate(model, prompts, max_new_tokens=4, bad_words=packed)
    b = generate(model, prompts, max_new_tokens=4, bad_words=[[[7], [8, 9]], []])
    assert a.output_ids == b.output_ids


def test_presence_penalty_against_a_manual_loop(models, prompts):
    _, model = models
    prompt, penalty = prompts[0], 0.8
    ours = generate(model, [prompt], max_new_tokens=6, presence_penalty=penalty)
    seq = list(prompt)
    for _ in range(6):
        logits = model.logits([seq])[0][-1].float().cpu()
        logits[sorted(set(seq))] -= penalty
        seq.append(int(logits.argmax()))
        if seq[-1] == model.config.end_id:
            break
    assert ours.output_ids[0] == seq


def test_seed_gives_same_tokens_whatever_the_batch(models, prompts):
    _, model = models
    kwargs = dict(max_new_tokens=8, top_k=0, top_p=0.9, temperature=1.5, repetition_penalty=1.2)
    alone = generate(model, prompts[:1], random_seed=42, **kwargs)
    crowd = generate(model, [prompts[1], prompts[0], prompts[1]], random_seed=[1, 42, 2], **kwargs)
    assert crowd.output_ids[1] == alone.output_ids[0]
    other = generate(model, prompts[:1], random_seed=43, **kwargs)
    assert other.output_ids[0] != alone.output_ids[0]


@pytest.mark.parametrize("beam_width, len_penalty", [(2, 1.0), (3, 0.5), (4, 2.0)])
def test_beam_search_equals_hf(models, prompts, beam_width, len_penalty):
    hf, model = models
    ours = generate(model, prompts, max_new_tokens=N_NEW, beam_width=beam_width, len_penalty=len_penalty)
    for b, prompt in enumerate(prompts):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              do_sample=False, num_beams=beam_width, length_penalty=len_penalty,
                              max_new_tokens=N_NEW, pad_token_id=52, eos_token_id=52)
        assert ours.output_ids[b] == ref[0].tolist(), f"request {b}"
        assert len(ours.beams[b]) == beam_width and ours.beams[b][0] == ours.output_ids[b]
        assert ours.beam_scores[b] == sorted(ours.beam_scores[b], reverse=True)


def test_beam_search_diversity_extreme_is_greedy(models, prompts):
    # a rate so large that every beam may only extend with its own best token: the best hypothesis is the greedy one
    _, model = models
    greedy = generate(model, prompts, max_new_tokens=N_NEW)
    diverse = generate(model, prompts, max_new_tokens=N_NEW, beam_width=3, beam_search_diversity_rate=1e4)
    plain = generate(model, prompts, max_new_tokens=N_NEW, beam_width=3)
    assert diverse.output_ids == greedy.output_ids
    assert plain.output_ids != greedy.output_ids  # so the rate really changed the search


@pytest.mark.parametrize("kwargs, message", [
    (dict(beam_width=65), r"beam_width must be an integer in \[1, 64\]"),
    (dict(beam_width=2, top_k=40), "beam search is deterministic"),
    (dict(len_penalty=0.5), "need beam_width > 1"),
    (dict(repetition_penalty=0.0), "repetition_penalty of request 0 = 0.0 must be > 0"),
    (dict(repetition_penalty=-1.0), "must be > 0"),
    (dict(repetition_penalty=1.2, presence_penalty=0.5), "exclusive"),
    (dict(min_length=-1), "min_length of request 0"),
    (dict(stop_words=[[[]], []]), r"stop_words\[0\]\[0\] must be a non-empty list"),
    (dict(bad_words=[[[99]], []]), r"bad_words\[0\]\[0\] = \[99\] has ids outside the vocabulary"),
    (dict(bad_words=[[1, 2]]), "one list of words per request"),
    (dict(bad_words=torch.zeros(2, 3, 4, dtype=torch.long)), r"shape \[batch, 2, L\]"),
    (dict(bad_words=torch.tensor([[[1, 2], [2, 1]], [[1, 2], [1, -1]]])), "offset 1 after 2 is not increasing"),
    (dict(temperatur=0.5), "unknown generation parameter"),
])
def test_bad_inputs(models, prompts, kwargs, message):
    _, model = models
    with pytest.raises(GenerationError, match=message):
        generate(model, prompts, max_new_tokens=2, **kwargs)
