"""One table of ranges (memdec_fast.ranges): every numeric flag of every subcommand parses by it, and the ops take
exactly the values it allows (issue 19, item 4).

Both sides are probed at each range's edges (the ends, their float neighbours, one step past an int end) and at
NaN and the infinities, so a parser and an op cannot drift apart unnoticed.
"""

from __future__ import annotations

import argparse
import math

import pytest
import torch

from memdec_fast import cli
from memdec_fast.cli.args import RangeType, subcommands
from memdec_fast.ops import params
from memdec_fast.ranges import FLAGS, FLOAT32_MAX, RANGES, Range, check

SERVER_ONLY = {"serve.port", "serve.drain_timeout", "serve.max_body_bytes"}  # settings of the server process itself, no op behind them


def edges(r: Range, huge: bool = True) -> list[int | float]:
    """Values at and around the ends of `r`; `huge` adds the far values (an op may run them, so they cost time)."""
    ends = [e for e in (r.low, r.high) if math.isfinite(e)]
    if r.kind is int:
        values = {v for e in ends for v in (e - 1, e, e + 1)} | {-1, 0, 1, 2}
        return sorted(values)
    values = {v for e in ends for v in (e, math.nextafter(e, -math.inf), math.nextafter(e, math.inf))}
    values |= {-1.0, 0.0, 0.5, 1.0, 2.0}
    if huge:
        values |= {1e300, math.inf, -math.inf, math.nan}
    return sorted(values, key=lambda v: (math.isnan(v), v))


def text(v: float) -> str:
    return repr(v) if isinstance(v, float) else str(v)


def all_flags() -> list[tuple[str, str]]:
    return [(command, flag) for command, flags in FLAGS.items() for flag in flags]


@pytest.fixture(scope="module")
def parser() -> argparse.ArgumentParser:
    return cli.build_parser()


def action_of(parser, command: str, flag: str) -> argparse.Action:
    sub = dict(subcommands(parser))[command]
    return next(a for a in sub._actions if flag in a.option_strings)


# -- the table and the parser --------------------------------------------------------------------------------------


def numeric(kind) -> bool:
    """Whether an argparse type makes numbers (a validator of text, such as a name check, does not)."""
    if kind in (None, str):
        return False
    for sample in ("1", "0", "0.5"):
        try:
            return isinstance(kind(sample), (int, float))
        except (ValueError, TypeError, argparse.ArgumentTypeError):
            continue
    return False


def test_every_numeric_flag_of_every_subcommand_is_in_the_table(parser):
    commands = dict(subcommands(parser))
    assert set(FLAGS) <= set(commands), set(FLAGS) - set(commands)
    for command, sub in commands.items():
        for action in sub._actions:
            if action.option_strings and numeric(action.type):
                assert isinstance(action.type, RangeType), (command, action.option_strings, action.type)
                assert any(o in FLAGS[command] for o in action.option_strings), (command, action.option_strings)
    for command, flag in all_flags():
        assert FLAGS[command][flag] in RANGES
        action_of(parser, command, flag)  # no stale entry


def test_float32_max_is_torchs():
    assert FLOAT32_MAX == torch.finfo(torch.float32).max == params.FLOAT32_MAX


@pytest.mark.parametrize(("command", "flag"), all_flags())
def test_the_parser_takes_exactly_the_tables_range(parser, command, flag):
    action = action_of(parser, command, flag)
    r = RANGES[FLAGS[command][flag]]
    for v in edges(r):
        try:
            got = action.type(text(v))
        except argparse.ArgumentTypeError as err:
            assert v not in r, f"{command} {flag} {text(v)} refused: {err}"
            assert "outside" in str(err) and r.describe() in str(err)
        else:
            assert v in r, f"{command} {flag} {text(v)} accepted, but the range is {r.describe()}"
            assert got == v and type(got) is r.kind
    if r.kind is int:
        with pytest.raises(argparse.ArgumentTypeError, match="not an int"):
            action.type("1.5")
    defaults = action.default if isinstance(action.default, list) else [action.default]
    assert all(d is None or d in r for d in defaults), (command, flag, action.default)
    assert r.describe() in action.help  # --help shows the range


@pytest.mark.parametrize(("command", "flag"), all_flags())
def test_a_value_out_of_range_is_one_line_and_status_2_before_anything_loads(command, flag, capsys, monkeypatch):
    import memdec_fast

    def never(*_a, **_k):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(memdec_fast.JointGenerator, "from_pretrained", never)
    r = RANGES[FLAGS[command][flag]]
    bad = next(v for v in edges(r) if v not in r)
    with pytest.raises(SystemExit) as stop:
        cli.main([*command.split(), f"{flag}={text(bad)}"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"argument {flag}: {text(bad)} is outside {r.describe()}" in err, err


def test_help_shows_every_default(parser):
    # item 19.5: the formatter shows a default only beside a help text, and None not at all: such an option's
    # help must say its default in its own words
    hidden = []
    for command, sub in subcommands(parser):
        for action in sub._actions:
            if not action.option_strings or action.required or isinstance(action, (
                    argparse._HelpAction, argparse._StoreTrueAction, argparse._AppendAction)):
                continue
            if not action.help or (action.default is None and "default" not in action.help):
                hidden.append((command, action.option_strings[-1]))
    assert not hidden


def test_generate_help_says_one_json_object_per_prompt(parser, capsys):
    with pytest.raises(SystemExit):
        cli.main(["generate", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "one object per prompt, one per line" in out and "print one JSON object on stdout" not in out


# -- the table and the ops -----------------------------------------------------------------------------------------


def _accepts(call) -> bool:
    """True when `call()` runs; False when it raises ValueError (any other error is a failure of the test)."""
    try:
        call()
    except ValueError:
        return False
    return True


def _named(name: str, call) -> bool:
    """For ops probed without real inputs: False when `call()` refuses `name` (a ValueError starting with it),
    True when it gets past that check (and then fails on the missing input)."""
    try:
        call()
    except ValueError as err:
        if str(err).startswith(f"{name}:"):
            return False
    except OSError:
        pass
    return True


@pytest.fixture(scope="module")
def probes(ckpts, tmp_path_factory) -> dict:
    """RANGES key -> (probe(value) -> accepted?, huge values too?)."""
    from memdec_fast import JointGenerator, perplexity
    from memdec_fast.cli.bench import run_bench
    from memdec_fast.engine import Engine

    gen = JointGenerator.from_pretrained(ckpts["base"], ckpts["decoder"], device="cpu")
    tmp = tmp_path_factory.mktemp("probes")
    nothing = tmp / "nothing"  # no datastore here: the trainers must refuse a bad number before they look
    text_ = ["the quick brown fox jumps over the lazy dog " * 4]
    out: dict = {}
    for name in ("lmbda", "knn_temp", "base_temp", "temperature", "top_k", "top_p", "min_p"):
        out[f"generate.{name}"] = (lambda v, n=name: _accepts(lambda: params.check_params(1, **{n: v})), True)
    out["generate.max_new_tokens"] = (lambda v: _accepts(lambda: gen.generate("the", max_new_tokens=v)), False)
    out["generate.seed"] = (lambda v: _accepts(lambda: gen.generate("the", max_new_tokens=2, temperature=1.0,
                                                                    seed=v)), False)
    out["generate.repetition_penalty"] = (
        lambda v: _accepts(lambda: gen.generate("the quick the", max_new_tokens=2, repetition_penalty=v)), True)
    out["ppl.lmbda"] = (lambda v: _accepts(lambda: perplexity(gen, None, text_, lmbda=v, progress=False)), True)
    out["ppl.knn_temp"] = (lambda v: _accepts(lambda: perplexity(gen, None, text_, knn_temp=v, progress=False)), True)
    for name in ("block_size", "stride", "batch_size"):
        kw = {"block_size": 16} if name == "stride" else {}
        out[f"ppl.{name}"] = (lambda v, n=name, kw=kw: _accepts(
            lambda: perplexity(gen, None, text_, **{n: v}, **kw, progress=False)), False)
    bench = {"prompt_tokens": lambda v: ([v], [1], 2, 1), "batch_size": lambda v: ([2], [v], 2, 1),
             "new_tokens": lambda v: ([2], [1], v, 1), "repeats": lambda v: ([2], [1], 2, v)}
    for name, args in bench.items():
        out[f"bench.{name}"] = (lambda v, a=args: _accepts(lambda: run_bench(gen, *a(v))), False)
    for name in ("max_batch", "max_queue", "prefill_chunk", "prefill_steps", "max_context"):
        out[f"engine.{name}"] = (lambda v, n=name: _accepts(lambda: Engine(gen, **{n: v})), False)

    from memdec_fast.train import TrainConfig, build_datastore, build_knn_targets, train_mlp_memory
    from memdec_fast.train.compare import compare

    def datastore(**kw):
        build_datastore(ckpts["base"], text_ * 4, tmp / f"ds-{kw}", **{"block_size": 8, **kw})

    out["datastore.block_size"] = (lambda v: _accepts(lambda: datastore(block_size=v)), False)
    out["datastore.batch_size"] = (lambda v: _accepts(lambda: datastore(batch_size=v)), False)
    for name in ("k", "temperature", "width", "exact_max"):
        out[f"targets.{name}"] = (lambda v, n=name: _named(n, lambda: build_knn_targets(nothing, **{n: v})), True)
    for name in ("epochs", "batch_size", "lr", "warmup_steps", "grad_clip", "alpha", "save_every", "seed"):
        out[f"train.{name}"] = (lambda v, n=name: _accepts(lambda: TrainConfig(**{n: v})), True)
    out["train.knn_temp"] = (lambda v: _named("knn_temp", lambda: train_mlp_memory(nothing, tmp / "mlp",
                                                                                   knn_temps=[v])), True)
    for name in ("n_layer", "n_embd"):
        out[f"mlp.{name}"] = (lambda v, n=name: _named(n, lambda: train_mlp_memory(nothing, tmp / "mlp",
                                                                                   **{n: v})), False)
    for name in ("k", "temperature", "knn_lmbda", "new_tokens"):
        out[f"compare.{name}"] = (lambda v, n=name: _named(n, lambda: compare(nothing, nothing, nothing, [],
                                                                              **{n: v})), True)
    return out


def test_every_entry_has_a_probe(probes):
    assert set(probes) == set(RANGES) - SERVER_ONLY


@pytest.mark.parametrize("key", sorted(set(RANGES) - SERVER_ONLY))
def test_the_op_takes_exactly_the_tables_range(probes, key):
    probe, huge = probes[key]
    r = RANGES[key]
    for v in edges(r, huge):
        assert probe(v) == (v in r), f"{key}={v!r}: the op {'accepts' if probe(v) else 'refuses'} it, " \
                                     f"the table's range is {r.describe()}"


def test_check_names_the_parameter():
    with pytest.raises(ValueError, match=r"^top_p: 0\.0 is outside \(0\.0, 1\.0\]$"):
        check("generate.top_p", 0.0)
    with pytest.raises(ValueError, match=r"^n: 0 is outside \[1, inf\)$"):
        check("mlp.n_layer", 0, "n")
