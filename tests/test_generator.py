"""JointGenerator against plain loops implementing the mixture formula over transformers models."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import build_tokenizer, save_gpt2, save_mlp_memory
from finish_cases import across_tokens, at_last_token, tokenizer_with_eos
from test_models import hf, mlp_input_hook, mlp_memory_formula
from transformers import PreTrainedTokenizerFast

from memdec_fast import GenerationResult, JointGenerator
from memdec_fast.models import GPT2

PROMPTS = ["the quick brown fox", "a plug", "memory decoders give a base", "héllo"]


@pytest.fixture(scope="module")
def gens(ckpts):
    """Generators for both memory types, on the fast path and the reference path."""
    out = {}
    for mem in ("decoder", "mlp"):
        for ref in (False, True):
            out[mem, ref] = JointGenerator.from_pretrained(ckpts["base"], ckpts[mem], lmbda=0.4, knn_temp=0.8,
                                                           reference=ref)
    return out


def mixture_loop(ckpts, memory: str, prompt: list[int], steps: int, lmbda: float, knn_temp: float, vocab: int):
    """Greedy decoding, one full transformers forward per step, p mixed by the formula in float64."""
    base = hf(ckpts["base"])
    mem = hf(ckpts["decoder"]) if memory == "decoder" else None
    seq, logps = list(prompt), []
    for _ in range(steps):
        ids = torch.tensor([seq])
        with torch.no_grad():
            if mem is None:
                seen = []
                handle = mlp_input_hook(base, 0, seen)  # the "mlp" memory reads h[0]'s MLP input
                b = base(ids).logits[0, -1, :vocab]
                handle.remove()
                m = mlp_memory_formula(ckpts["mlp"], seen[0][0, -1])[:vocab]
            else:
                b, m = base(ids).logits[0, -1, :vocab], mem(ids).logits[0, -1, :vocab]
        p = (1 - lmbda) * torch.softmax(b.double(), -1) + lmbda * torch.softmax(m.double() / knn_temp, -1)
        seq.append(int(p.argmax()))
        logps.append(math.log(p.max()))
    return seq[len(prompt):], logps


@pytest.mark.parametrize("reference", [False, True])
@pytest.mark.parametrize("memory", ["decoder", "mlp"])
def test_greedy_equals_the_mixture_formula_loop(gens, ckpts, tokenizer, memory, reference):
    gen = gens[memory, reference]
    for prompt in PROMPTS[:2]:
        ids = tokenizer.encode(prompt)
        res = gen.generate(ids, max_new_tokens=8)
        want, want_lp = mixture_loop(ckpts, memory, ids, 8, 0.4, 0.8, len(tokenizer))
        assert res.token_ids[0] == want
        assert res.finish_reasons == ["length"]
        assert torch.allclose(torch.tensor(res.logprobs[0]), torch.tensor(want_lp), atol=1e-4)


@pytest.mark.parametrize("memory", ["decoder", "mlp"])
def test_batch_with_left_padding_equals_each_prompt_alone(gens, memory):
    gen = gens[memory, False]
    batch = gen.generate(PROMPTS, max_new_tokens=10)
    for i, prompt in enumerate(PROMPTS):
        alone = gen.generate(prompt, max_new_tokens=10)
        assert batch.token_ids[i] == alone.token_ids[0]
        assert batch.texts[i] == alone.texts[0]
        assert torch.allclose(torch.tensor(batch.logprobs[i]), torch.tensor(alone.logprobs[0]), atol=1e-4)


def test_lean_and_transformers_paths_agree_on_padded_batches(gens):
    for memory in ("decoder", "mlp"):
        a = gens[memory, False].generate(PROMPTS, max_new_tokens=8)
        b = gens[memory, True].generate(PROMPTS, max_new_tokens=8)
        assert a.token_ids == b.token_ids


def test_per_row_lmbda_selects_each_model(gens, ckpts, tokenizer):
    """lmbda 0 is the base alone and lmbda 1 the memory alone, in one batch."""
    gen = gens["decoder", False]
    res = gen.generate([PROMPTS[0]] * 2, max_new_tokens=6, lmbda=[0.0, 1.0])
    ids = tokenizer.encode(PROMPTS[0])
    assert res.token_ids[0] == mixture_loop(ckpts, "decoder", ids, 6, 0.0, 0.8, len(tokenizer))[0]
    assert res.token_ids[1] == mixture_loop(ckpts, "decoder", ids, 6, 1.0, 0.8, len(tokenizer))[0]
    assert res.token_ids[0] != res.token_ids[1]


def test_eos_and_stop_ids_end_rows_early_and_batch_rows_still_match(gens, tokenizer):
    gen = gens["decoder", False]
    full = gen.generate(PROMPTS, max_new_tokens=12)
    stop_id = full.token_ids[0][3]
    res = gen.generate(PROMPTS, max_new_tokens=12, stop=[stop_id])
    for i, toks in enumerate(full.token_ids):
        n = toks.index(stop_id) + 1 if stop_id in toks else len(toks)
        assert res.token_ids[i] == toks[:n]
        assert res.texts[i] == tokenizer.decode(toks[:n], skip_special_tokens=True)  # not left empty
        # a stop token id reports "stop", as HF and OpenAI do; "eos" is kept for the tokenizer's EOS
        assert res.finish_reasons[i] == ("stop" if stop_id in toks else "length")
        assert gen.generate(PROMPTS[i], max_new_tokens=12, stop=stop_id).token_ids[0] == toks[:n]
    # the same token as the tokenizer's EOS
    eos_tok = copy.deepcopy(tokenizer)
    eos_tok.eos_token = tokenizer.convert_ids_to_tokens(stop_id)
    eos_gen = JointGenerator(gen.base, gen.memory, eos_tok, lmbda=0.4, knn_temp=0.8)
    eos_res = eos_gen.generate(PROMPTS[0], max_new_tokens=12)
    assert eos_res.token_ids[0] == res.token_ids[0]
    assert eos_res.finish_reasons[0] == ("eos" if stop_id in full.token_ids[0] else "length")


def test_stop_strings_cut_the_text(gens):
    gen = gens["decoder", False]
    full = gen.generate(PROMPTS[0], max_new_tokens=16).texts[0]
    stop = full[5:7]
    cut = full.find(stop)
    res = gen.generate(PROMPTS[0], max_new_tokens=16, stop=["never appears", stop])
    assert res.texts[0] == full[:cut]
    assert res.finish_reasons == ["stop"]
    assert len(res.token_ids[0]) < 16
    assert "".join(gen.stream(PROMPTS[0], max_new_tokens=16, stop=[stop])) == full[:cut]


def test_each_stop_condition_at_the_last_token_reports_its_reason(gens):
    # max_new_tokens is reached by the very token that stops the row: the stop wins, as in HF and vLLM
    gen = gens["decoder", False]
    case = at_last_token(gen, PROMPTS)
    full = gen.generate(case.prompt, max_new_tokens=case.n)
    assert full.finish_reasons == ["length"]
    for stop in ([case.stop_id], case.stop_string, ["never appears", case.stop_id]):
        res = gen.generate(case.prompt, max_new_tokens=case.n, stop=stop)
        assert res.token_ids == full.token_ids, stop
        assert res.finish_reasons == ["stop"], stop
        assert res.texts == ([case.text_before_stop] if stop == case.stop_string else full.texts), stop
    assert gen.generate(case.prompt, max_new_tokens=case.n, stop=case.stop_string).texts == [case.text_before_stop]
    eos_gen = JointGenerator(gen.base, gen.memory, tokenizer_with_eos(gen.tokenizer, case.stop_id), lmbda=0.4,
                             knn_temp=0.8)
    res = eos_gen.generate(case.prompt, max_new_tokens=case.n)
    assert res.token_ids == full.token_ids and res.finish_reasons == ["eos"]
    pieces = list(gen.stream(case.prompt, max_new_tokens=case.n, stop=case.stop_string))
    assert "".join(pieces) == case.text_before_stop


def assert_stream_never_takes_back(pieces: list[str], final: str) -> None:
    """Every prefix of the stream is a prefix of the final text, and the whole stream is that text."""
    sent = ""
    for piece in pieces:
        sent += piece
        assert final.startswith(sent), f"streamed {sent!r}, but the text is {final!r}"
    assert sent == final


@pytest.mark.parametrize("width", [2, 3, 5])
def test_stream_holds_back_a_stop_string_begun_at_the_end_of_a_token(gens, width):
    # the stop string's first width - 1 characters end a token: streamed at once, they could not be taken back
    gen = gens["mlp", False]
    case = across_tokens(gen, PROMPTS, width=width)
    res = gen.generate(case.prompt, max_new_tokens=16, stop=case.stop)
    assert res.texts == [case.text_before_stop] and res.finish_reasons == ["stop"]
    assert len(res.token_ids[0]) == case.at
    assert_stream_never_takes_back(list(gen.stream(case.prompt, max_new_tokens=16, stop=case.stop)),
                                   case.text_before_stop)
    # the same prefix, with a stop that never completes: held back while it might, then sent
    never = case.stop[:-1] + "\x00"
    whole = gen.generate(case.prompt, max_new_tokens=case.at, stop=never).texts[0]
    assert whole.startswith(case.text_before_stop + case.stop)
    assert_stream_never_takes_back(list(gen.stream(case.prompt, max_new_tokens=case.at, stop=never)), whole)


@pytest.mark.parametrize("memory", ["decoder", "mlp"])
def test_stream_equals_generate(gens, memory):
    gen = gens[memory, False]
    counts = []
    for kwargs in ({}, {"temperature": 1.2, "top_k": 50, "seed": 11}):
        for prompt in PROMPTS:
            pieces = list(gen.stream(prompt, max_new_tokens=12, **kwargs))
            counts.append(len(pieces))
            assert "".join(pieces) == gen.generate(prompt, max_new_tokens=12, **kwargs).texts[0]
    assert max(counts) > 3  # text arrives in pieces, not at the end


def test_seed_reproducibility(gens):
    gen = gens["mlp", False]
    kw = {"max_new_tokens": 16, "temperature": 1.5, "top_p": 0.95, "min_p": 0.01}
    a = gen.generate(PROMPTS, seed=1, **kw)
    b = gen.generate(PROMPTS, seed=1, **kw)
    c = gen.generate(PROMPTS, seed=2, **kw)
    assert a.token_ids == b.token_ids and a.logprobs == b.logprobs
    assert a.token_ids != c.token_ids


def test_input_forms_and_result(gens, tokenizer):
    gen = gens["decoder", False]
    ids = tokenizer.encode(PROMPTS[2])
    res = gen.generate(PROMPTS[2], max_new_tokens=5)
    assert isinstance(res, GenerationResult)
    assert gen.generate(ids, max_new_tokens=5).token_ids == res.token_ids
    assert gen.generate(torch.tensor([ids, ids]), max_new_tokens=5).token_ids == res.token_ids * 2
    assert res.texts[0] == tokenizer.decode(res.token_ids[0])
    assert all(lp <= 0 for lp in res.logprobs[0]) and len(res.logprobs[0]) == 5


@pytest.mark.parametrize("memory", ["decoder", "mlp"])
def test_score_logits(gens, ckpts, tokenizer, memory):
    gen = gens[memory, False]
    ids = torch.randint(0, len(tokenizer), (2, 11), generator=torch.Generator().manual_seed(0))
    base_logits, mem_logits = gen.score_logits(ids)
    V = len(tokenizer)
    assert base_logits.shape == mem_logits.shape == (2, 11, V)
    with torch.no_grad():
        seen = []
        handle = mlp_input_hook(hf(ckpts["base"]), 0, seen) if memory == "mlp" else None
        model = hf(ckpts["base"])
        if handle is not None:
            handle.remove()
            handle = mlp_input_hook(model, 0, seen)
        want_base = model(ids).logits[..., :V]
        want_mem = mlp_memory_formula(ckpts["mlp"], seen[0])[..., :V] if memory == "mlp" else (
            hf(ckpts["decoder"])(ids).logits[..., :V])
    assert (base_logits - want_base).abs().max() < 1e-4
    assert (mem_logits - want_mem).abs().max() < 1e-4
    assert gen.tokenizer is tokenizer or len(gen.tokenizer) == V
    assert gen.max_context == 64 and gen.device == torch.device("cpu")


# -- errors -------------------------------------------------------------------------------------------


def test_tokenizer_mismatch(tmp_path, ckpts):
    from tokenizers import Tokenizer, models, pre_tokenizers

    other = Tokenizer(models.WordLevel({"<eos>": 0, "a": 1, "b": 2}, unk_token="<eos>"))
    other.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=other, eos_token="<eos>")
    path = save_gpt2(tmp_path / "mem", build_tokenizer(), seed=4, save_tokenizer=False)
    tok.save_pretrained(path)
    with pytest.raises(ValueError, match="tokenizer mismatch"):
        JointGenerator.from_pretrained(ckpts["base"], path)


def test_vocabulary_mismatch(tmp_path, ckpts, tokenizer):
    small = save_gpt2(tmp_path / "small", tokenizer, seed=4, save_tokenizer=False, vocab_size=len(tokenizer) - 1)
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        JointGenerator.from_pretrained(ckpts["base"], small)
    other = save_gpt2(tmp_path / "other", tokenizer, seed=4, save_tokenizer=False, vocab_size=len(tokenizer) + 64)
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        JointGenerator.from_pretrained(ckpts["base"], other)
    mlp = save_mlp_memory(tmp_path / "mlp", len(tokenizer) + 64, seed=5, n_embd=32, input_dim=None, layer_position=-1)
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        JointGenerator.from_pretrained(ckpts["base"], mlp)


def test_mlp_memory_that_does_not_fit_the_base(tmp_path, ckpts, tokenizer):
    vocab = len(tokenizer) + 5
    wide = save_mlp_memory(tmp_path / "wide", vocab, seed=5, n_embd=48, input_dim=None, layer_position=-1)
    with pytest.raises(ValueError, match="hidden size"):
        JointGenerator.from_pretrained(ckpts["base"], wide)
    deep = save_mlp_memory(tmp_path / "deep", vocab, seed=5, n_embd=32, input_dim=None, layer_position=2)
    with pytest.raises(ValueError, match="layer_position 2"):
        JointGenerator.from_pretrained(ckpts["base"], deep)


def test_unknown_memory_type(ckpts):
    with pytest.raises(ValueError, match="unknown memory type 'knn'"):
        JointGenerator.from_pretrained(ckpts["base"], ckpts["decoder"], memory_type="knn")


def test_missing_and_corrupt_files(tmp_path, ckpts):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        JointGenerator.from_pretrained(ckpts["base"], tmp_path)
    (tmp_path / "config.json").write_text((ckpts["decoder"] / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="no weights"):
        JointGenerator.from_pretrained(ckpts["base"], tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="corrupt checkpoint"):
        JointGenerator.from_pretrained(ckpts["base"], tmp_path, memory_type="decoder")
    with pytest.raises(ValueError, match="corrupt checkpoint"):
        JointGenerator.from_pretrained(ckpts["base"], tmp_path)  # auto-detection reads the header too
    (tmp_path / "model.safetensors").write_bytes((ckpts["decoder"] / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="no usable tokenizer"):
        JointGenerator.from_pretrained(tmp_path, ckpts["decoder"])


def test_prompt_longer_than_the_context_window(gens, tokenizer):
    gen = gens["decoder", False]
    with pytest.raises(ValueError, match="context window is 64"):
        gen.generate([1] * 65, max_new_tokens=1)
    with pytest.raises(ValueError, match="prompt too long"):
        gen.generate([1] * 60, max_new_tokens=10)
    gen.generate([1] * 60, max_new_tokens=5)  # 60 + 5 - 1 positions fit
    with pytest.raises(ValueError, match="input_ids"):
        gen.score_logits(torch.ones(1, 65, dtype=torch.long))


def test_empty_prompt(gens):
    gen = gens["decoder", False]
    for bad in ("", [], ["ok", ""], [[1, 2], []]):
        with pytest.raises(ValueError, match="empty"):
            gen.generate(bad, max_new_tokens=2)


@pytest.mark.parametrize("kwargs, name", [
    ({"temperature": -1.0}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_k": 1.5}, "top_k"),
    ({"min_p": 2.0}, "min_p"),
    ({"lmbda": 1.5}, "lmbda"),
    ({"lmbda": [0.1, 0.2]}, "lmbda"),  # one prompt, two values
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"seed": -3}, "seed"),
    ({"stop": [10**9]}, "stop"),
    ({"prompts": [[1, 10**9]]}, "prompts"),
])
def test_bad_sampling_parameters(gens, kwargs, name):
    kwargs = {"prompts": "hi", "max_new_tokens": 2, **kwargs}
    with pytest.raises(ValueError, match=name):
        gens["decoder", False].generate(**kwargs)
    with pytest.raises(ValueError, match="knn_temp"):
        JointGenerator(gens["decoder", False].base, gens["decoder", False].memory, build_tokenizer(), 0.5, knn_temp=0.0)


def test_nan_logits_raise(ckpts, tokenizer):
    base = GPT2.from_pretrained(ckpts["base"])
    base.ln_f.weight.fill_(float("nan"))
    gen = JointGenerator(base, GPT2.from_pretrained(ckpts["decoder"]), tokenizer, lmbda=0.5)
    with pytest.raises(RuntimeError, match="NaN or infinite logits"):
        gen.generate("hi", max_new_tokens=3)


def finished_row_turns_nan(gen: JointGenerator, prompts: list[str], steps: int, monkeypatch) -> tuple[int, list]:
    """Make the memory's decode logits NaN in batch row 0, and pick a stop id that ends row 0 at its first token.

    Returns the stop id and the token ids the rows should still get. The other
    rows stay live, so row 0 stays in the batch and samples -1 at every step.
    """
    want = gen.generate(prompts, max_new_tokens=steps).token_ids
    stop_id = want[0][0]
    if any(stop_id in ids for ids in want[1:]):
        pytest.skip("the first token of row 0 also ends another row for these random weights")
    slot_forward = gen.memory.slot_forward

    def nan_row_0(tokens: torch.Tensor, positions, caches, rows, *args):
        logits, hidden = slot_forward(tokens, positions, caches, rows, *args)
        if isinstance(rows, slice):  # a decode step: row i is slot i, prompt i
            logits = logits.clone()
            logits[0] = math.nan
        return logits, hidden

    monkeypatch.setattr(gen.memory, "slot_forward", nan_row_0)
    return stop_id, [[stop_id]] + want[1:]


def test_nan_logits_of_a_finished_row_still_in_the_batch_are_not_fed_back(ckpts, monkeypatch):
    gen = JointGenerator.from_pretrained(ckpts["base"], ckpts["decoder"], lmbda=0.4)
    stop_id, want = finished_row_turns_nan(gen, PROMPTS[:3], 6, monkeypatch)
    assert gen.generate(PROMPTS[:3], max_new_tokens=6, stop=stop_id).token_ids == want


def test_other_architectures_fall_back_to_transformers(tmp_path, ckpts, tokenizer):
    """A base memdec_fast's lean models refuse (here a Llama with dynamic rope scaling) runs through transformers,
    with a Memory Decoder or an MLP Memory on its h[-1] MLP input."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer) + 5, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2,
                      bos_token_id=0, eos_token_id=0, rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    llama = LlamaForCausalLM(cfg).eval()
    llama.save_pretrained(tmp_path / "llama")
    tokenizer.save_pretrained(tmp_path / "llama")
    memory, seen = hf(ckpts["decoder"]), []
    handle = llama.model.layers[-1].mlp.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    for mem in ("decoder", "mlp_last"):
        gen = JointGenerator.from_pretrained(tmp_path / "llama", ckpts[mem], lmbda=0.5)
        assert type(gen.base).__name__ == "HFRunner"
        res = gen.generate(PROMPTS[:2], max_new_tokens=5)
        for i, prompt in enumerate(PROMPTS[:2]):
            seq = tokenizer.encode(prompt)
            for _ in range(5):
                with torch.no_grad():
                    b = llama(torch.tensor([seq])).logits[0, -1, :len(tokenizer)]
                    m = (memory(torch.tensor([seq])).logits[0, -1] if mem == "decoder"
                         else mlp_memory_formula(ckpts[mem], seen[-1][0, -1]))[:len(tokenizer)]
                seq.append(int((torch.softmax(b, -1) + torch.softmax(m, -1)).argmax()))
            assert res.token_ids[i] == seq[-5:]
    handle.remove()
