"""The model runners against transformers' GPT-2, on tiny random checkpoints."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import PAD_ROWS, save_gpt2
from transformers import GPT2LMHeadModel

from memdec_fast.models import GPT2, GPT2Runner, HFRunner, MLPMemory, detect_memory_type
from memdec_fast.models.cache import Packing
from memdec_fast.models.gpt2 import activation


@functools.cache
def hf(path) -> GPT2LMHeadModel:
    """transformers' GPT-2 for a checkpoint (cached: tests must not modify it)."""
    return GPT2LMHeadModel.from_pretrained(path).eval()


def random_ids(tokenizer, *shape, seed=0) -> torch.Tensor:
    return torch.randint(0, len(tokenizer), shape, generator=torch.Generator().manual_seed(seed))


def mlp_memory_formula(path, hidden: torch.Tensor) -> torch.Tensor:
    """The upstream MLP Memory, straight from the raw checkpoint tensors (Conv1D weights are [in, out])."""
    import json

    from safetensors.torch import load_file

    w = load_file(str(path / "model.safetensors"))
    cfg = json.loads((path / "config.json").read_text())
    act = activation(cfg["activation_function"])
    eps = cfg["layer_norm_epsilon"]
    x = hidden
    if "embedding_transform.weight" in w:
        x = x @ w["embedding_transform.weight"].T + w["embedding_transform.bias"]
    for i in range(cfg["n_layer"]):
        p = f"h.{i}."
        h = torch.nn.functional.layer_norm(x, x.shape[-1:], w[p + "ln_1.weight"], w[p + "ln_1.bias"], eps)
        h = act(h @ w[p + "mlp.c_fc.weight"] + w[p + "mlp.c_fc.bias"])
        x = x + h @ w[p + "mlp.c_proj.weight"] + w[p + "mlp.c_proj.bias"]
    x = torch.nn.functional.layer_norm(x, x.shape[-1:], w["ln_f.weight"], w["ln_f.bias"], eps)
    return x @ w["lm_head.weight"].T


def mlp_input_hook(model: GPT2LMHeadModel, layer: int, store: list):
    """Record the input of h[layer].mlp (the output of ln_2) on every forward."""
    return model.transformer.h[layer].mlp.register_forward_pre_hook(lambda _m, args: store.append(args[0]))


@pytest.mark.parametrize("name", ["base", "decoder"])
def test_gpt2_logits_match_transformers(ckpts, tokenizer, name):
    ids = random_ids(tokenizer, 3, 21)
    ours, _ = GPT2.from_pretrained(ckpts[name])(ids, torch.arange(21).expand(3, 21))
    with torch.no_grad():
        theirs = hf(ckpts[name])(ids).logits
    print("max abs diff", (ours - theirs).abs().max().item())
    assert ours.shape == theirs.shape == (3, 21, len(tokenizer) + PAD_ROWS)
    assert (ours - theirs).abs().max() < 1e-4


def test_gpt2_loads_pytorch_model_bin_and_untied_head(tmp_path, tokenizer):
    path = save_gpt2(tmp_path / "bin", tokenizer, seed=7, tie_word_embeddings=False)
    model = hf(path)
    (path / "model.safetensors").unlink()
    torch.save(model.state_dict(), path / "pytorch_model.bin")
    ours = GPT2.from_pretrained(path)
    assert ours.lm_head is not None  # a separate head, not the embedding
    ids = random_ids(tokenizer, 2, 9)
    with torch.no_grad():
        assert (ours(ids, torch.arange(9).expand(2, 9))[0] - model(ids).logits).abs().max() < 1e-4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpt2_low_precision_close_to_float32(ckpts, tokenizer, dtype):
    ids = random_ids(tokenizer, 2, 12)
    pos = torch.arange(12).expand(2, 12)
    ref, _ = GPT2.from_pretrained(ckpts["base"])(ids, pos)
    low, _ = GPT2.from_pretrained(ckpts["base"], dtype=dtype)(ids, pos)
    err = (low.float() - ref).abs()
    print(dtype, "max", err.max().item(), "mean", err.mean().item())
    assert low.dtype == dtype and err.max() < 0.05 * ref.abs().max()


def test_hidden_state_is_the_input_of_the_mlp(ckpts, tokenizer):
    ids = random_ids(tokenizer, 2, 10)
    model, seen = hf(ckpts["base"]), []
    handle = mlp_input_hook(model, 0, seen)
    with torch.no_grad():
        model(ids)
    handle.remove()
    _, hidden = GPT2.from_pretrained(ckpts["base"])(ids, torch.arange(10).expand(2, 10), hidden_layer=0)
    assert (hidden - seen[0]).abs().max() < 1e-5


def slot_steps(runner, prompts: list[list[int]], new: torch.Tensor, packed: bool = True
               ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A lean runner as the engine's step drives it: the prompts prefilled into cache rows of their own in one
    right-padded forward (its blocks computing the real tokens only, unless not `packed`), then one decode step per
    row of `new` [steps, B], each row at its own position. Returns (logits [B, V], hidden [B, D]) after the prefill
    and after each step."""
    B, T = len(prompts), max(map(len, prompts))
    length = T + new.shape[0]
    caches = runner.new_slot_caches(B, length + 1)  # slot `length`: scratch for the padding
    ids, pos = torch.zeros(B, T, dtype=torch.int64), torch.zeros(B, T, dtype=torch.int64)
    slots = torch.full((B, T), length)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(p)
        pos[i, : len(p)] = slots[i, : len(p)] = torch.arange(len(p))
    last = torch.tensor([len(p) - 1 for p in prompts])
    packing = Packing.of([len(p) for p in prompts], T, ids.device) if packed else None
    outs = [runner.slot_forward(ids, pos, caches, torch.arange(B), length, slots, last, packing)]
    at = torch.tensor([len(p) for p in prompts])  # [B] each row's next position
    for step in new:
        outs.append(runner.slot_forward(step[:, None], at[:, None], caches, slice(0, B), length))
        at = at + 1
    return outs


@pytest.mark.parametrize("runner", ["lean", "transformers"])
def test_cached_steps_match_each_row_alone(ckpts, tokenizer, runner):
    """Cached steps (the lean runner's slot caches, transformers' left-padded batch) give each row the logits of a
    plain forward over that row alone."""
    model = hf(ckpts["base"])
    r = GPT2Runner(GPT2.from_pretrained(ckpts["base"])) if runner == "lean" else HFRunner(hf(ckpts["base"]))
    r.hidden_layer = -1
    lengths, steps = [7, 3, 5], 4
    prompts = [random_ids(tokenizer, n, seed=n).tolist() for n in lengths]
    new = random_ids(tokenizer, steps, 3, seed=99)
    if runner == "lean":
        outs = slot_steps(r, prompts, new)
    else:
        T = max(lengths)
        ids = torch.tensor([[0] * (T - len(p)) + p for p in prompts])
        mask = torch.tensor([[False] * (T - len(p)) + [True] * len(p) for p in prompts])
        outs = [r.prefill(ids, mask, T + steps)] + [r.decode(new[s]) for s in range(steps)]
    for b, p in enumerate(prompts):
        full = torch.tensor([p + new[:, b].tolist()])
        seen = []
        handle = mlp_input_hook(model, -1, seen)
        with torch.no_grad():
            want = model(full).logits[0, len(p) - 1:]
        handle.remove()
        for s, (lg, hd) in enumerate(outs):
            assert (lg[b] - want[s]).abs().max() < 1e-4, (b, s)
            assert (hd[b] - seen[0][0, len(p) - 1 + s]).abs().max() < 1e-4, (b, s)


def test_keep_rows_drops_rows_without_changing_the_others(ckpts, tokenizer):
    def make():
        return HFRunner(hf(ckpts["base"]))

    ids = random_ids(tokenizer, 3, 6)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[1, :2] = False
    a, b = make(), make()
    a.prefill(ids, mask, 9)
    b.prefill(ids, mask, 9)
    tok = random_ids(tokenizer, 3, seed=5)
    a.decode(tok)
    b.decode(tok)
    b.keep_rows(torch.tensor([0, 2]))
    nxt = random_ids(tokenizer, 3, seed=6)
    assert (a.decode(nxt)[0][[0, 2]] - b.decode(nxt[[0, 2]])[0]).abs().max() < 1e-5


@pytest.mark.parametrize("name", ["mlp", "mlp_last"])
def test_mlp_memory_matches_the_upstream_formula(ckpts, name):
    memory = MLPMemory.from_pretrained(ckpts[name])
    x = torch.randn(4, 5, memory.input_dim)
    assert (memory(x) - mlp_memory_formula(ckpts[name], x)).abs().max() < 1e-4
    assert memory.layer_position == (0 if name == "mlp" else -1)


def test_detect_memory_type(ckpts):
    assert detect_memory_type(ckpts["decoder"]) == "decoder"
    assert detect_memory_type(ckpts["mlp"]) == "mlp"  # has mlp_memory_config.json
    assert detect_memory_type(ckpts["mlp_last"]) == "mlp"  # MLP weights, no attention


def test_missing_and_corrupt_checkpoints(tmp_path, ckpts):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        GPT2.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text((ckpts["base"] / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="no weights"):
        GPT2.from_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file" * 10)
    with pytest.raises(ValueError, match="corrupt checkpoint"):
        GPT2.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt JSON"):
        GPT2.from_pretrained(tmp_path)


def test_checkpoint_with_missing_or_misshapen_tensors(tmp_path, ckpts):
    from safetensors.torch import load_file, save_file

    state = load_file(str(ckpts["base"] / "model.safetensors"))
    (tmp_path / "config.json").write_text((ckpts["base"] / "config.json").read_text())
    save_file({k: v for k, v in state.items() if "h.1.mlp" not in k}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="missing 4 tensors"):
        GPT2.from_pretrained(tmp_path)
    state["transformer.ln_f.weight"] = torch.ones(3)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="ln_f.weight has shape"):
        GPT2.from_pretrained(tmp_path)


@pytest.mark.parametrize(("rows", "heads", "queries", "slots"), [(8, 3, 1, 37), (13, 2, 4, 70), (3, 5, 1, 9)])
def test_attend_equals_float64_attention_over_strided_cache_views(rows, heads, queries, slots):
    from memdec_fast.models.cache import attend

    g = torch.Generator().manual_seed(rows * 100 + slots)
    cache_k, cache_v = (torch.randn(rows + 2, heads, slots + 5, 16, generator=g) for _ in range(2))
    k, v = cache_k[1 : rows + 1, :, :slots], cache_v[1 : rows + 1, :, :slots]  # strided views, as a step reads them
    q = torch.randn(rows, heads, queries, 16, generator=g)
    lengths = torch.randint(1, slots + 1, (rows,), generator=g)
    mask = (torch.arange(slots) < lengths[:, None])[:, None, None, :]  # [B, 1, 1, S]: a decode step's
    got = attend(q, k, v, mask, 0.3)
    want = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask,
                                                            scale=0.3)
    print(f"max |attend - float64| = {(got.double() - want).abs().max():.2e}")
    torch.testing.assert_close(got.double(), want, atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize(("lengths", "kv_heads", "group", "rows"), [
    ((1, 5, 1, 1, 3, 1, 1, 1, 1), 2, 1, "slice"),  # decode rows and prompt chunks of two lengths, cache views
    ((4, 1, 1, 4, 1, 1, 1, 1, 1, 1), 2, 3, "index"),  # grouped queries; chunks of one length; gathered cache rows
    ((1, 2, 1), 1, 2, "slice"),  # fewer rows than a CPU decode step's matmul path
    ((3, 5, 2), 2, 1, "slice"),  # no one-token row: an ordinary packed prefill
])
def test_attend_cache_over_packed_rows_of_mixed_lengths_equals_float64_attention(lengths, kv_heads, group, rows):
    from memdec_fast.models.cache import SlotCache, attend_cache

    g = torch.Generator().manual_seed(sum(lengths) * 10 + group)
    B, T, S, D = len(lengths), max(lengths) + 1, 41, 8  # one column more than the longest row: every row padded
    start = torch.randint(0, S - T, (B,), generator=g)  # each row's first position
    pos = start[:, None] + torch.arange(T)  # [B, T]
    cache_k, cache_v = (torch.randn(B + 3, kv_heads, S + 1, D, generator=g) for _ in range(2))  # S: scratch
    want_k, want_v = cache_k.clone().double(), cache_v.clone().double()
    cache_rows = slice(1, B + 1) if rows == "slice" else torch.randperm(B + 3, generator=g)[:B]
    packing = Packing.of(list(lengths), T, torch.device("cpu"))
    N = sum(lengths)
    q = torch.randn(N, kv_heads * group, D, generator=g)  # the real tokens only, packed
    k, v = (torch.randn(N, kv_heads, D, generator=g) for _ in range(2))
    mask = (torch.arange(S) <= pos[:, :, None])[:, None]  # [B, 1, T, S]
    slots = torch.where(torch.arange(T) < torch.tensor(lengths)[:, None], pos, S)  # padding to the scratch slot
    got = attend_cache(q, k, v, mask, slots, SlotCache(cache_k, cache_v, cache_rows, S), 0.3, packing)
    assert got.shape == q.shape and (packing.mixed is not None) == (1 in lengths)
    idx = list(range(B + 3))[cache_rows] if rows == "slice" else cache_rows.tolist()
    at = 0
    for b, n in enumerate(lengths):  # float64, row by row: write the row's keys, attend over its slots
        r, p = idx[b], pos[b, :n]
        want_k[r, :, p], want_v[r, :, p] = k[at : at + n].double().transpose(0, 1), v[at : at + n].double().transpose(0, 1)
        kk, vv = (t[r, :, :S].repeat_interleave(group, 0) for t in (want_k, want_v))  # [H, S, Dh]
        want = torch.nn.functional.scaled_dot_product_attention(
            q[at : at + n].double().transpose(0, 1), kk, vv, attn_mask=mask[b, 0, :n], scale=0.3)  # [H, n, Dh]
        torch.testing.assert_close(got[at : at + n].double(), want.transpose(0, 1), atol=2e-6, rtol=2e-6)
        at += n
    for r in set(idx):  # the cache holds every real token's keys and values, nothing else changed
        torch.testing.assert_close(cache_k[r, :, :S].double(), want_k[r, :, :S])
        torch.testing.assert_close(cache_v[r, :, :S].double(), want_v[r, :, :S])


def test_packing_keeps_the_real_tokens_and_restores_the_padded_layout():
    assert Packing.of([3, 3], 3, torch.device("cpu")) is None  # nothing padded: nothing to pack
    packing = Packing.of([2, 5, 1], 5, torch.device("cpu"))
    x = torch.randn(3, 5, 4)
    packed = packing.pack(x)
    assert packed.shape == (8, 4) and torch.equal(packed[2:7], x[1])
    back = packing.unpack(packed)
    assert torch.equal(back[1], x[1]) and torch.equal(back[0, :2], x[0, :2]) and not back[0, 2:].any()
    assert packing.select([1]) is None and packing.select([2, 0]).lengths == (1, 2)
    assert packing.mixed.rows.tolist() == [0, 1] and packing.mixed.first.tolist() == [0, 2, 7]
    assert packing.mixed.tokens.tolist() == list(range(7)) and packing.mixed.packing.lengths == (2, 5)
    assert Packing.of([2, 3], 3, torch.device("cpu")).mixed is None  # no one-token row: a plain prefill


def test_a_packed_prefill_equals_the_padded_one_and_so_do_the_steps_after_it(ckpts):
    runner = GPT2Runner(GPT2.from_pretrained(ckpts["base"]))
    runner.hidden_layer = -1
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 100, (n,), generator=g).tolist() for n in (7, 2, 11, 5)]
    new = torch.randint(0, 100, (3, 4), generator=g)
    for (packed_logits, packed_hidden), (logits, hidden) in zip(slot_steps(runner, prompts, new),
                                                                slot_steps(runner, prompts, new, packed=False)):
        torch.testing.assert_close(packed_logits, logits, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(packed_hidden, hidden, atol=2e-5, rtol=1e-5)
