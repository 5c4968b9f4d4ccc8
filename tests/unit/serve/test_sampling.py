"""The batched sampler: per-row settings in one call, HF-equivalent filters, seeded reproducibility."""

from __future__ import annotations

import pytest
import torch

from chatray.serve.sampling import SamplerPlan, SamplingParams, new_seed, sample, seeded_uniforms


def _rows(n: int, temperature=1.0, top_k=0, top_p=1.0, penalty=1.0):
    def full(v, dtype):
        return torch.tensor(v if isinstance(v, list) else [v] * n, dtype=dtype)

    return {"temperature": full(temperature, torch.float32), "top_k": full(top_k, torch.long),
            "top_p": full(top_p, torch.float32), "repetition_penalty": full(penalty, torch.float32)}


def test_temperature_zero_is_argmax():
    logits = torch.randn(4, 50)
    out = sample(logits, **_rows(4, temperature=0.0), uniforms=torch.rand(4))
    assert out.tolist() == logits.argmax(-1).tolist()


def test_top_k_one_and_tiny_top_p_are_greedy():
    logits = torch.randn(3, 50)
    for kw in ({"top_k": 1}, {"top_p": 1e-6}):
        for _ in range(5):
            out = sample(logits, **_rows(3, **kw), uniforms=torch.rand(3))
            assert out.tolist() == logits.argmax(-1).tolist()


def test_per_row_settings_in_one_batch():
    logits = torch.randn(3, 100)
    rows = _rows(3, temperature=[0.0, 1.0, 1.0], top_k=[0, 5, 0], top_p=[1.0, 1.0, 0.5])
    top5 = set(logits[1].topk(5).indices.tolist())
    probs = logits[2].softmax(-1)
    order = probs.argsort(descending=True)
    nucleus = set(order[: int((probs[order].cumsum(0) < 0.5).sum()) + 1].tolist())
    for _ in range(200):
        out = sample(logits, **rows, uniforms=torch.rand(3)).tolist()
        assert out[0] == int(logits[0].argmax())
        assert out[1] in top5
        assert out[2] in nucleus


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.7]]))
    seeds = torch.full((4000,), new_seed(123))
    uniforms = seeded_uniforms(seeds, torch.arange(4000))  # one request's first 4000 draws
    counts = torch.zeros(3)
    for u in uniforms:
        counts[sample(logits, **_rows(1), uniforms=u[None])] += 1
    assert torch.allclose(counts / counts.sum(), torch.tensor([0.1, 0.2, 0.7]), atol=0.03)


def test_repetition_penalty_matches_transformers():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    logits = torch.randn(2, 20)
    history = torch.tensor([[1, 2, 3], [4, 5, 5]])
    seen = torch.zeros(2, 20, dtype=torch.bool)
    seen.scatter_(1, history, True)
    ours = sample(logits.clone(), **_rows(2, temperature=0.0, penalty=1.7), uniforms=torch.rand(2), seen=seen)
    ref = RepetitionPenaltyLogitsProcessor(1.7)(history, logits.clone()).argmax(-1)
    assert ours.tolist() == ref.tolist()


def test_presence_and_frequency_penalties_follow_openai_definition():
    """logit -= count * frequency_penalty + (count > 0) * presence_penalty, per row, before temperature."""
    logits = torch.randn(3, 30)
    counts = torch.zeros(3, 30)
    counts[0, 4], counts[0, 7], counts[1, 4], counts[2, 9] = 3, 1, 2, 5
    presence, frequency = torch.tensor([0.5, -1.0, 0.0]), torch.tensor([1.5, 0.0, 0.0])
    want = logits - counts * frequency[:, None] - (counts > 0).float() * presence[:, None]
    for _ in range(3):  # greedy rows take the argmax of the penalized logits; sampled rows draw from them
        greedy = sample(logits, **_rows(3, temperature=0.0), uniforms=torch.rand(3), counts=counts,
                        presence_penalty=presence, frequency_penalty=frequency)
        assert greedy.tolist() == want.argmax(-1).tolist()
    u = seeded_uniforms(torch.tensor([5, 6, 7]), torch.zeros(3, dtype=torch.long))
    got = sample(logits, **_rows(3, temperature=0.8), uniforms=u, counts=counts, presence_penalty=presence,
                 frequency_penalty=frequency)
    assert got.tolist() == sample(want, **_rows(3, temperature=0.8), uniforms=u).tolist()
    # a penalty large enough moves the argmax off a repeated token
    peaked = torch.zeros(1, 5)
    peaked[0, 2] = 1.0
    seen_twice = torch.zeros(1, 5)
    seen_twice[0, 2] = 2
    kw = {**_rows(1, temperature=0.0), "uniforms": torch.rand(1), "counts": seen_twice}
    assert sample(peaked, **kw, presence_penalty=torch.zeros(1), frequency_penalty=torch.zeros(1)).item() == 2
    assert sample(peaked, **kw, presence_penalty=torch.zeros(1), frequency_penalty=torch.ones(1)).item() != 2
    assert sample(peaked, **kw, presence_penalty=torch.tensor([1.5]), frequency_penalty=torch.zeros(1)).item() != 2


def test_seeded_uniforms_are_a_function_of_seed_and_counter_only():
    seeds, counters = torch.tensor([7, 7, 8, 2**62 + 7]), torch.tensor([0, 1, 0, 0])
    u = seeded_uniforms(seeds, counters)
    assert u.dtype == torch.float32 and bool(((u >= 0) & (u < 1)).all())
    assert len(set(u.tolist())) == 4  # other counter, other seed, other high half: other draws
    # batch-invariant: the same (seed, counter) draws the same number alone or among others, in any order
    assert seeded_uniforms(seeds[1:2], counters[1:2]).item() == u[1].item()
    assert seeded_uniforms(seeds.flip(0), counters.flip(0)).flip(0).tolist() == u.tolist()
    many = seeded_uniforms(torch.full((20000,), 99), torch.arange(20000))
    assert abs(many.mean().item() - 0.5) < 0.01 and abs(many.var().item() - 1 / 12) < 0.003
    assert new_seed(-1) == new_seed(2**63 - 1) and 0 <= new_seed(2**70 + 3) < 2**63  # any int folds into range
    assert new_seed(None) != new_seed(None)


def test_plan_from_the_host_matches_the_tensors():
    """The host-side plan (no device sync) takes the same branches the tensors would."""
    logits = torch.randn(3, 40)
    params = [SamplingParams(temperature=0.0), SamplingParams(top_k=5, repetition_penalty=1.2),
              SamplingParams(top_p=0.5, presence_penalty=0.5)]
    plan = SamplerPlan.of(params)
    assert plan == SamplerPlan(all_greedy=False, top_k=True, top_p=True, repetition=True, presence_frequency=True)
    rows = _rows(3, temperature=[0.0, 1.0, 1.0], top_k=[0, 5, 0], top_p=[1.0, 1.0, 0.5], penalty=[1.0, 1.2, 1.0])
    extra = {"seen": torch.rand(3, 40) > 0.5, "counts": torch.rand(3, 40).round(),
             "presence_penalty": torch.tensor([0.0, 0.0, 0.5]), "frequency_penalty": torch.zeros(3)}
    u = torch.rand(3)
    assert sample(logits, **rows, **extra, uniforms=u, plan=plan).tolist() == \
        sample(logits, **rows, **extra, uniforms=u).tolist()


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"temperature": -0.1}, "temperature"), ({"temperature": 2.5}, "temperature"),
    ({"temperature": float("nan")}, "temperature"), ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"), ({"max_tokens": 0}, "max_tokens"), ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"stop": ("",)}, "stop"), ({"stop": "x"}, "stop"), ({"seed": 1.5}, "seed"),
    ({"presence_penalty": 2.5}, "presence_penalty"), ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"logprobs": 21}, "logprobs"), ({"prompt_logprobs": -1}, "prompt_logprobs"), ({"logprobs": True}, "logprobs"),
])
def test_params_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_ranking_only_the_top_k_candidates_picks_what_a_full_sort_picks():
    logits = torch.randn(4, 500)
    rows = _rows(4, temperature=[0.7, 1.0, 0.0, 1.3], top_k=[5, 40, 0, 12], top_p=[1.0, 0.8, 1.0, 0.9])
    fast = SamplerPlan.of([SamplingParams(temperature=0.7, top_k=5), SamplingParams(top_k=40, top_p=0.8),
                           SamplingParams(temperature=0.0), SamplingParams(temperature=1.3, top_k=12, top_p=0.9)])
    assert fast.candidates == 40  # the greedy row's top_k does not matter
    full = SamplerPlan(**{**fast.__dict__, "candidates": 0})
    for seed in range(50):
        u = seeded_uniforms(torch.full((4,), seed), torch.arange(4))
        assert sample(logits, **rows, uniforms=u, plan=fast).tolist() == \
            sample(logits, **rows, uniforms=u, plan=full).tolist()


def test_a_rows_token_does_not_depend_on_its_batch_mates_settings():
    """Same row, same random number: the same token whatever the other rows ask for (which changes how the
    sampler ranks), also with bf16 logits, whose ties are common among the best candidates."""
    torch.manual_seed(0)
    row = (torch.randn(5000) * 3).to(torch.bfloat16).float()
    assert len(set(row.topk(50).values.tolist())) < 50  # ties there are

    def token(mine: SamplingParams, mate: SamplingParams, u: float) -> int:
        params = [mine, mate]

        def col(get, dtype=torch.float32):
            return torch.tensor([get(p) for p in params], dtype=dtype)

        return sample(row.expand(2, -1).clone(), temperature=col(lambda p: p.temperature),
                      top_k=col(lambda p: p.top_k, torch.long), top_p=col(lambda p: p.top_p),
                      repetition_penalty=col(lambda p: p.repetition_penalty), uniforms=torch.full((2,), u),
                      plan=SamplerPlan.of(params))[0].item()

    mates = [SamplingParams(), SamplingParams(top_p=0.9), SamplingParams(top_k=40), SamplingParams(top_k=1000),
             SamplingParams(temperature=0.0)]
    for mine in (SamplingParams(), SamplingParams(top_k=50), SamplingParams(top_p=0.8),
                 SamplingParams(top_k=30, top_p=0.9, temperature=0.7)):
        for i in range(300):
            u = (i + 0.5) / 300
            picks = {token(mine, mate, u) for mate in mates}
            assert len(picks) == 1, f"{mine} drew {picks} at u={u} depending on its batch-mate"


def test_top_k_keeps_every_token_tied_with_the_kth():
    logits = torch.tensor([[3.0, 2.0, 2.0, 2.0, 1.0]])
    picks = {sample(logits, **_rows(1, top_k=2), uniforms=torch.tensor([u / 50])).item() for u in range(50)}
    assert picks == {0, 1, 2, 3}  # the 2nd best value is shared by three tokens: all three stay, as in transformers
