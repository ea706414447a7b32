"""The plugin on vLLM's engine against memdec_fast's own: greedy tokens, prompt logprobs, sampling frequencies."""

from __future__ import annotations

import math

import pytest
import torch
from plugin_setup import LMBDA, SERVED
from scipy.stats import chisquare
from vllm import SamplingParams, TokensPrompt

from memdec_fast import perplexity, reference

KINDS = ["decoder", "mlp"]
PROMPTS = ["the quick brown fox", "a", "memory decoders give a base model domain", "héllo wörld"]


@pytest.mark.parametrize("kind", list(SERVED))
def test_greedy_tokens_match_joint_generator(kind, engines, generators):
    gen = generators(kind)
    want = gen.generate(PROMPTS, max_new_tokens=16)
    outs = engines(kind).generate(PROMPTS, SamplingParams(temperature=0, max_tokens=16, logprobs=0,
                                                          ignore_eos=True, detokenize=False))
    got = [list(o.outputs[0].token_ids) for o in outs]
    # JointGenerator stops at EOS; compare each row up to where it ended
    for row, (mine, theirs) in enumerate(zip(want.token_ids, got)):
        assert theirs[: len(mine)] == mine, f"prompt {row} ({PROMPTS[row]!r})"
    # the reported logprobs are log p_mix of the chosen tokens
    for mine, out in zip(want.logprobs, outs):
        theirs = [step[tok].logprob for step, tok in zip(out.outputs[0].logprobs, out.outputs[0].token_ids)]
        diff = max(abs(a - b) for a, b in zip(mine, theirs))
        print(f"max |logprob diff| {diff:.2e}")
        assert diff < 1e-4


@pytest.mark.parametrize("kind", KINDS)
def test_prompt_logprobs_give_memdec_fast_perplexity(kind, engines, pairs, tokenizer):
    ids = tokenizer("memory decoders give a base model domain knowledge, and the quick brown fox jumps").input_ids
    out = engines(kind).generate(TokensPrompt(prompt_token_ids=ids),
                                 SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False))[0]
    scored = [step[tok].logprob for step, tok in zip(out.prompt_logprobs[1:], ids[1:])]
    got = math.exp(-sum(scored) / len(scored))
    want = perplexity(*(pairs[name] for name in SERVED[kind]), ids, lmbda=LMBDA, block_size=len(ids) + 1, stride=len(ids),
                      device="cpu", progress=False)
    print(f"vLLM {got:.6f}, memdec_fast {want.joint_ppl[LMBDA]:.6f}, base alone {want.base_ppl:.6f}")
    assert want.tokens == len(scored)
    assert got == pytest.approx(want.joint_ppl[LMBDA], rel=1e-5)


def exact_distribution(gen, ids: list[int], **filters) -> torch.Tensor:
    """The next-token distribution sampling must follow after `ids`: the filtered mixture, float64 [V]."""
    base, mem = gen.score_logits(torch.tensor([ids]), last=1)  # [1, 1, V] each
    logp = reference.component_logprobs(base[:, -1], mem[:, -1], LMBDA)[0]
    return torch.softmax(reference.filtered_logits(logp, **filters), -1)[0]


def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Chi-square p-value of token counts against probabilities; tokens expected fewer than 5 times share a bin."""
    expected = probs * counts.sum()
    big = expected >= 5
    obs, exp = counts[big].tolist(), expected[big].tolist()
    if expected[~big].sum() > 0:
        obs.append(counts[~big].sum().item())
        exp.append(expected[~big].sum().item())
    return chisquare(obs, exp).pvalue


# vLLM applies min-p before top-k and top-p, Hugging Face after: the same kept set without top-p, so min-p is
# tested beside top-k only
@pytest.mark.parametrize("filters", [{}, {"temperature": 0.7, "top_k": 12, "top_p": 0.9},
                                     {"temperature": 0.8, "top_k": 40, "min_p": 0.2}],
                         ids=["plain", "temperature,top_k,top_p", "temperature,top_k,min_p"])
def test_seeded_sampling_follows_the_mixture(filters, engines, generators, tokenizer):
    draws = 3000
    ids = tokenizer("the quick brown").input_ids
    llm, gen = engines("decoder"), generators("decoder")
    params = [SamplingParams(temperature=filters.get("temperature", 1.0), top_k=filters.get("top_k", 0),
                             top_p=filters.get("top_p", 1.0), min_p=filters.get("min_p", 0.0), max_tokens=1, seed=i,
                             detokenize=False)
              for i in range(draws)]
    outs = llm.generate([TokensPrompt(prompt_token_ids=ids)] * draws, params, use_tqdm=False)
    tokens = torch.tensor([o.outputs[0].token_ids[0] for o in outs])
    probs = exact_distribution(gen, ids, **filters)
    counts = torch.bincount(tokens, minlength=len(probs)).double()
    assert counts[probs == 0].sum() == 0, "a token outside the filtered mixture was drawn"
    p_mix = chi2_pvalue(counts, probs)
    print(f"{int((probs > 0).sum())} tokens possible; chi2 p-value against the mixture {p_mix:.3g}")
    assert p_mix > 1e-3
    if not filters:  # the test has the power to tell the mixture from the base alone
        base_logits = gen.score_logits(torch.tensor([ids]), last=1)[0][0, -1]  # [V]
        p_base = chi2_pvalue(counts, torch.softmax(base_logits.double(), -1))
        print(f"chi2 p-value against the base alone {p_base:.3g}")
        assert p_base < 1e-6
    again = llm.generate([TokensPrompt(prompt_token_ids=ids)] * 3, params[:3], use_tqdm=False)
    assert [o.outputs[0].token_ids[0] for o in again] == tokens[:3].tolist(), "the same seed drew another token"


def test_repetition_penalty_acts_on_the_shifted_scores(engines, generators, tokenizer):
    """vLLM's penalty (HF's: positive scores divided, negative ones multiplied) on log p_mix + logsumexp(base), the
    scores the plugin returns; greedy, stepped here by hand from JointGenerator's logits."""
    ids, penalty, steps = tokenizer("the quick brown fox").input_ids, 1.5, 10
    llm, gen = engines("decoder"), generators("decoder")

    def greedy(repetition_penalty: float) -> list[int]:
        params = SamplingParams(temperature=0, max_tokens=steps, repetition_penalty=repetition_penalty,
                                ignore_eos=True, detokenize=False)
        return list(llm.generate(TokensPrompt(prompt_token_ids=ids), params, use_tqdm=False)[0].outputs[0].token_ids)

    seq = list(ids)
    for _ in range(steps):
        base, mem = (x[0, -1].double() for x in gen.score_logits(torch.tensor([seq]), last=1))  # [V] each
        scores = reference.component_logprobs(base[None], mem[None], LMBDA)[0][0] + torch.logsumexp(base, -1)
        seen = torch.zeros_like(scores, dtype=torch.bool)
        seen[seq] = True
        scores = torch.where(seen, torch.where(scores > 0, scores / penalty, scores * penalty), scores)
        seq.append(int(scores.argmax()))
    got = greedy(penalty)
    print(f"with the penalty {got}; without {greedy(1.0)}")
    assert got == seq[len(ids):]
    assert got != greedy(1.0), "the penalty changed nothing: the test would not see it act"
