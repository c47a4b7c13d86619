"""Generation: seeded and reproducible; temperature 0, top-k 1 and a tiny nucleus are greedy."""

from __future__ import annotations

import torch

from orchestrator.models.build import build_model
from orchestrator.run.sampling import generate, next_token
from tests.conftest import make_job


def _model():
    return build_model(make_job(["model=gpt2_tiny"]).model, seed=3)


def _run(model, seed: int, **kw) -> list[int]:
    settings = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, **kw}
    return generate(model, [1, 2, 3], 24, g=torch.Generator().manual_seed(seed), **settings)


def test_same_seed_same_text_and_different_seed_differs() -> None:
    model = _model()
    assert _run(model, 0) == _run(model, 0)
    assert _run(model, 0) != _run(model, 1)


def test_greedy_limits() -> None:
    model = _model()
    greedy = _run(model, 0, temperature=0.0)
    assert _run(model, 7, top_k=1) == greedy
    assert _run(model, 9, top_p=1e-6) == greedy
    assert _run(model, 5, temperature=1e-4) == greedy  # temperature -> 0


def test_top_k_and_top_p_only_draw_from_the_allowed_set() -> None:
    logits = torch.tensor([5.0, 4.0, 3.0, -2.0, -9.0])
    g = torch.Generator().manual_seed(0)
    assert {next_token(logits, 1.0, 2, 1.0, g) for _ in range(200)} <= {0, 1}
    probs = torch.softmax(logits, -1)  # 0.66, 0.24, ...: the 0.8 nucleus is {0, 1}
    assert probs[0] < 0.8 < probs[0] + probs[1]
    assert {next_token(logits, 1.0, 0, 0.8, g) for _ in range(200)} == {0, 1}


def test_a_batch_of_prompts_gives_each_prompt_its_own_completion() -> None:
    """Left padding, masks and positions make batching invisible: with one generator per
    prompt, a batch yields exactly what each prompt gives alone (sampled and greedy)."""
    from orchestrator.run.sampling import generate_batch

    model = _model()
    prompts = [[5, 6, 7, 8, 9, 10, 11], [1, 2], [40, 41, 42, 43]]
    for temperature in (0.0, 1.0):
        alone = [generate(model, p, 20, temperature, 0, 1.0, torch.Generator().manual_seed(i))
                 for i, p in enumerate(prompts)]
        batch = generate_batch(model, prompts, 20, temperature, 0, 1.0,
                               [torch.Generator().manual_seed(i) for i in range(3)])
        assert batch == alone


def test_sampling_stays_inside_the_tokenizer_vocabulary() -> None:
    from orchestrator.run.sampling import generate_batch

    out = generate_batch(_model(), [[1, 2]], 50, 2.0, 0, 1.0, [torch.Generator()], vocab=258)
    assert max(out[0]) < 258
