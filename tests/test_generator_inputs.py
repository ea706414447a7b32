"""JointGenerator and perplexity at their edges: defaults from the memory, HF-style arguments, bad and hostile input,
and callers that overlap."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import EOS, save_gpt2
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

import memdec_fast
from memdec_fast import JointGenerator, reference
from memdec_fast.models import checkpoint

DEMO = Path(memdec_fast.__file__).parent / "data" / "demo"
PROMPTS = ["the quick brown fox", "a plug", "memory decoders give a base", "héllo"]


@pytest.fixture(scope="module")
def gen(ckpts):
    return JointGenerator.from_pretrained(ckpts["base"], ckpts["decoder"], lmbda=0.4, knn_temp=0.8)


# -- defaults stored with the memory ------------------------------------------------------------


def test_from_pretrained_takes_lmbda_and_knn_temp_stored_with_the_memory():
    stored = json.loads((DEMO / "memory" / "memdec_config.json").read_text())
    gen = JointGenerator.from_pretrained(DEMO / "base", DEMO / "memory")
    assert (gen.lmbda, gen.knn_temp) == (stored["lmbda"], stored.get("knn_temp", 1.0))
    # the README's snippet on the demo pair completes the fact the memory learned
    assert gen.generate("Olga Hill lives in", max_new_tokens=4).texts[0].strip().startswith("Llequa")
    assert JointGenerator.from_pretrained(DEMO / "base", DEMO / "memory", lmbda=0.1).lmbda == 0.1


def test_perplexity_defaults_fit_the_model_context():
    # block size = the model's context (128 here, at most 1024), stride = half of it; lmbda from the memory
    r = memdec_fast.perplexity(DEMO / "base", DEMO / "memory", DEMO / "domain_heldout.txt", progress=False)
    want = memdec_fast.perplexity(DEMO / "base", DEMO / "memory", DEMO / "domain_heldout.txt", lmbda=0.5,
                                  block_size=128, stride=64, progress=False)
    assert r == want
    alone = memdec_fast.perplexity(DEMO / "base", DEMO / "memory", DEMO / "domain_heldout.txt", block_size=128,
                                   progress=False)
    assert alone == want


@pytest.mark.parametrize("content, match", [
    ("[0.5]", "expected an object"), ('{"lmbda": null}', "lmbda must be a number"),
    ('{"lmbda": 2}', "lmbda must be a number"), ('{"knn_temp": 0}', "knn_temp must be a number"), ("{", "corrupt JSON"),
])
def test_a_broken_memdec_config_names_the_file(tmp_path, content, match):
    (tmp_path / "memdec_config.json").write_text(content)
    with pytest.raises(ValueError, match=match) as err:
        checkpoint.read_mixing(tmp_path)
    assert "memdec_config.json" in str(err.value)


# -- Hugging Face generate arguments ----------------------------------------------------------------


def test_do_sample_max_length_and_num_return_sequences(gen, tokenizer):
    greedy = gen.generate(PROMPTS[:2], max_new_tokens=6)
    assert gen.generate(PROMPTS[:2], max_new_tokens=6, do_sample=False, temperature=0.7).token_ids == greedy.token_ids
    sampled = gen.generate(PROMPTS[0], max_new_tokens=6, temperature=1.0, seed=3)
    assert gen.generate(PROMPTS[0], max_new_tokens=6, do_sample=True, seed=3).token_ids == sampled.token_ids
    longest = max(len(tokenizer.encode(p)) for p in PROMPTS[:2])
    assert gen.generate(PROMPTS[:2], max_length=longest + 6).token_ids == greedy.token_ids
    res = gen.generate(PROMPTS[:2], max_new_tokens=6, num_return_sequences=3)
    assert res.token_ids == [greedy.token_ids[0]] * 3 + [greedy.token_ids[1]] * 3
    seqs = gen.generate(PROMPTS[0], max_new_tokens=6, do_sample=True, seed=1, num_return_sequences=4).token_ids
    assert len(seqs) == 4 and len({tuple(s) for s in seqs}) > 1  # sampled rows draw independently
    with pytest.raises(ValueError, match="max_length"):
        gen.generate(PROMPTS[0], max_length=2)
    with pytest.raises(ValueError, match="not both"):
        gen.generate(PROMPTS[0], max_length=20, max_new_tokens=3)
    with pytest.raises(ValueError, match="num_return_sequences"):
        gen.generate(PROMPTS[0], num_return_sequences=0)


def _penalized_greedy(gen, prompt: list[int], steps: int, penalty: float) -> list[int]:
    """HF's rule on float64 log p of the mixture, one full forward per step."""
    seq = list(prompt)
    for _ in range(steps):
        b, m = gen.score_logits(torch.tensor([seq]), last=1)
        logp = reference.joint_logprobs(b[:, 0], m[:, 0], lmbda=gen.lmbda, knn_temp=gen.knn_temp)[0]
        seen = torch.zeros_like(logp, dtype=torch.bool)
        seen[seq] = True
        seq.append(int(torch.where(seen, logp * penalty, logp).argmax()))
        if seq[-1] == gen.tokenizer.eos_token_id:
            break
    return seq[len(prompt):]


@pytest.mark.parametrize("penalty", [1.6, 0.7])
def test_repetition_penalty_follows_hf(gen, tokenizer, penalty):
    for prompt in PROMPTS[:3]:
        ids = tokenizer.encode(prompt)
        res = gen.generate(ids, max_new_tokens=10, repetition_penalty=penalty)
        assert res.token_ids[0] == _penalized_greedy(gen, ids, 10, penalty)
    assert gen.generate(PROMPTS[0], max_new_tokens=10, repetition_penalty=1.6).token_ids != gen.generate(
        PROMPTS[0], max_new_tokens=10).token_ids
    with pytest.raises(ValueError, match="repetition_penalty"):
        gen.generate(PROMPTS[0], repetition_penalty=0)


@pytest.mark.parametrize("kwargs, hint", [
    ({"num_beams": 4}, "beam search"), ({"eos_token_id": 3}, "stop="), ({"streamer": object()}, "stream"),
    ({"frobnicate": 1}, "frobnicate"),
])
def test_other_hf_arguments_say_what_to_use_instead(gen, kwargs, hint):
    with pytest.raises(TypeError, match=hint):
        gen.generate(PROMPTS[0], **kwargs)
    with pytest.raises(TypeError, match=hint):
        next(gen.stream(PROMPTS[0], **kwargs))


# -- bad input that looks like good input -----------------------------------------------------------


def test_bytes_are_refused(gen):
    for call in (lambda: gen.generate(b"hi"), lambda: gen.generate([b"hi"]), lambda: next(gen.stream(b"hi")),
                 lambda: gen.generate("hi", stop=b"."), lambda: gen.generate("hi", stop=[b"."])):
        with pytest.raises(ValueError, match="bytes"):
            call()


def test_perplexity_refuses_a_path_that_names_no_file(tmp_path, gen):
    for data in ("does_not_exist.txt", str(tmp_path / "missing"), tmp_path / "missing.txt"):
        with pytest.raises(FileNotFoundError, match="no such file"):
            memdec_fast.perplexity(gen, None, data, progress=False)
    with pytest.raises(IsADirectoryError):
        memdec_fast.perplexity(gen, None, str(tmp_path), progress=False)
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt.*not UTF-8"):
        memdec_fast.perplexity(gen, None, bad, progress=False)
    # text with spaces and slashes is still text, and a list always is
    assert memdec_fast.perplexity(gen, None, "the fox and/or the dog", progress=False).tokens > 1
    assert memdec_fast.perplexity(gen, None, ["does_not_exist.txt"], progress=False).tokens > 1


def test_memory_of_the_wrong_type_says_what_it_looks_like(ckpts):
    with pytest.raises(ValueError, match="looks like a Memory Decoder"):
        JointGenerator.from_pretrained(ckpts["base"], ckpts["decoder"], memory_type="mlp")
    with pytest.raises(ValueError, match="looks like an MLP Memory"):
        JointGenerator.from_pretrained(ckpts["base"], ckpts["mlp_last"], memory_type="decoder")


# -- hostile or broken checkpoints --------------------------------------------------------------------


def _with_config(tmp_path: Path, src: Path, **changes) -> Path:
    out = tmp_path / "memory"
    shutil.copytree(src, out)
    cfg = json.loads((out / "config.json").read_text()) | changes
    (out / "config.json").write_text(json.dumps(cfg))
    return out


@pytest.mark.parametrize("changes, match", [
    ({"model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_hidden_layers": 32, "hidden_size": 4096},
     "num_hidden_layers=32"),
    ({"n_layer": 1_000_000_000}, "n_layer=1000000000"),
    # sizes that agree, names that do not: caught by building the model on the meta device, before any allocation
    ({"model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_hidden_layers": 3, "hidden_size": 48,
      "num_attention_heads": 3}, "do not fit its config.json"),
    ({"n_embd": 64}, "n_embd=64"),
])
def test_a_config_that_does_not_match_its_weights_is_refused_at_once(tmp_path, ckpts, changes, match):
    memory = _with_config(tmp_path, ckpts["decoder"], **changes)
    if "n_layer" in changes:
        changes.pop("model_type", None)
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=match):
        JointGenerator.from_pretrained(ckpts["base"], memory)
    assert time.perf_counter() - t0 < 10


def test_an_unknown_hub_name_offline_fails_in_seconds(tmp_path):
    code = ("import memdec_fast, time; t = time.perf_counter()\n"
            "try:\n    memdec_fast.JointGenerator.from_pretrained('no-such-org/no-such-model', 'no-such-org/mem')\n"
            "except FileNotFoundError as e:\n    print(round(time.perf_counter() - t, 1), e)\n")
    # an endpoint that refuses connections at once stands in for a machine without network
    env = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env, check=False)
    assert r.returncode == 0, r.stderr
    seconds, message = r.stdout.split(" ", 1)
    assert float(seconds) < 15 and "not in the Hugging Face cache" in message and "no-such-org/no-such-model" in message


# -- overlapping callers -------------------------------------------------------------------------------


def test_a_second_stream_in_the_same_thread_fails_at_once_and_the_first_is_untouched(gen):
    alone = gen.generate(PROMPTS[0], max_new_tokens=10).texts[0]
    first = gen.stream(PROMPTS[0], max_new_tokens=10)
    pieces = [next(first)]
    second = gen.stream(PROMPTS[1], max_new_tokens=10)
    with pytest.raises(RuntimeError, match="busy"):
        next(second)
    with pytest.raises(RuntimeError, match="busy"):
        gen.generate(PROMPTS[1], max_new_tokens=2)
    pieces += list(first)
    assert "".join(pieces) == alone
    # once the first is done, the generator is free again
    assert gen.generate(PROMPTS[0], max_new_tokens=10).texts[0] == alone
    abandoned = gen.stream(PROMPTS[0], max_new_tokens=10)
    next(abandoned)
    abandoned.close()
    assert gen.generate(PROMPTS[0], max_new_tokens=10).texts[0] == alone


def test_threads_calling_generate_take_turns(gen):
    serial = {p: gen.generate(p, max_new_tokens=8).token_ids[0] for p in PROMPTS}
    results, errors = [], []

    def worker(i: int):
        try:
            for j in range(4):
                p = PROMPTS[(i + j) % len(PROMPTS)]
                results.append((p, gen.generate(p, max_new_tokens=8).token_ids[0]))
        except Exception as err:  # noqa: BLE001 - collected and asserted on below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == [] and len(results) == 16
    assert all(toks == serial[p] for p, toks in results)


def test_a_tokenizer_of_the_same_size_with_other_ids_is_named_by_its_first_differing_token(tmp_path, ckpts, tokenizer):
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = state["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[100:102]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # two ids swapped: same tokens, same size
    other = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(state)), eos_token=EOS)
    path = save_gpt2(tmp_path / "mem", tokenizer, seed=4, save_tokenizer=False)
    other.save_pretrained(path)
    with pytest.raises(ValueError, match="tokenizer mismatch") as err:
        JointGenerator.from_pretrained(ckpts["base"], path)
    assert f"token {a!r} is id 100 in the base and id 101 in the memory" in str(err.value), err.value
