"""What a vLLM deployment asks of the plugin, read from the base's config and checked before any weight loads.

The user names the memory through ``hf_overrides`` on the base's config::

    {"architectures": ["MemDecForCausalLM"], "memdec_memory": PATH, "memdec_memory_type": "auto",
     "memdec_lmbda": 0.55, "memdec_knn_temp": 1.0}

Only memdec_memory is required; the type is detected and lmbda / knn_temp come from
the memory's stored values, as in :meth:`memdec_fast.JointGenerator.from_pretrained`.
Every check here raises ValueError with one sentence naming the problem. They run
in vLLM's front-end process when its config is built (see :func:`verify_deployment`),
and again in each worker before the model is built.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from memdec_fast.models import checkpoint, checks
from memdec_fast.ops.params import check_params
from memdec_fast.vllm import ARCHITECTURE


@dataclass(frozen=True)
class MemDecSettings:
    """The memory to serve beside the base, and how to mix them.

    memory : the path or hub name given as memdec_memory
    memory_type : "decoder" or "mlp" (never "auto": detected)
    lmbda, knn_temp : mixture weight of the memory and its softmax temperature
    base_architecture : the vLLM architecture of the base (its config's, before the override)
    vocab : len(tokenizer) of the base; the mixture covers these tokens, the rows beyond are -inf
    """

    memory: str
    memory_type: str
    lmbda: float
    knn_temp: float
    base_architecture: str
    vocab: int


def read_settings(hf_config, model: str, tokenizer: str | None = None) -> MemDecSettings:
    """The plugin's settings from the base's (overridden) config; ValueError on a bad or missing value.

    Parameters
    ----------
    hf_config : the base's transformers config, with the memdec_* overrides as attributes
    model : the base checkpoint vLLM serves (path or hub name)
    tokenizer : the tokenizer vLLM uses, when not the base's own
    """
    memory = getattr(hf_config, "memdec_memory", None)
    if not isinstance(memory, (str, os.PathLike)) or not os.fspath(memory):
        raise ValueError(f"{ARCHITECTURE}: name the memory in hf_overrides, e.g. "
                         '{"architectures": ["MemDecForCausalLM"], "memdec_memory": "path/to/memory"}')
    memory = os.fspath(memory)
    memory_type = getattr(hf_config, "memdec_memory_type", None) or "auto"
    checks.check_memory_type(memory_type, "memdec_memory_type")
    try:
        checkpoint.check_config_against_weights(memory)
    except (FileNotFoundError, ValueError) as err:
        raise ValueError(f"memdec_memory: {err}") from err
    memory_type = checks.resolve_memory_type(memory, memory_type, "memdec_memory_type")
    lmbda, knn_temp = checkpoint.mixing_defaults(memory, _number(hf_config, "memdec_lmbda"),
                                                 _number(hf_config, "memdec_knn_temp"))
    try:
        check_params(1, lmbda=lmbda, knn_temp=knn_temp)
    except ValueError as err:  # name the key the user set
        raise ValueError(f"memdec_{err}") from err
    tok = checks.load_tokenizer(tokenizer or model)
    checks.check_tokenizers(tok, memory)
    return MemDecSettings(memory, memory_type, float(lmbda), float(knn_temp), base_architecture(hf_config, model),
                          len(tok))


def _number(hf_config, key: str) -> float | None:
    value = getattr(hf_config, key, None)
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ValueError(f"{key}: expected a number, got {value!r}")
    return value


def base_architecture(hf_config, model: str) -> str:
    """The base's own architecture: its config.json's (the override replaced it), else its model type's."""
    try:
        found = checkpoint.load_config(model).get("architectures") or []
    except (FileNotFoundError, ValueError):
        found = []
    found = [a for a in found if a != ARCHITECTURE]
    if found:
        return found[0]
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(getattr(hf_config, "model_type", None))
    if name is None:
        raise ValueError(f"{model}: cannot tell the base's architecture (no 'architectures' in its config.json)")
    return name


def memory_config(settings: MemDecSettings):
    """The memory's transformers config; an MLP Memory's config.json is read as the GPT2Config upstream stores."""
    from transformers import AutoConfig, GPT2Config

    if settings.memory_type == "mlp":
        return GPT2Config.from_dict(checkpoint.load_config(settings.memory))
    return AutoConfig.from_pretrained(settings.memory)


def check_vocab(settings: MemDecSettings, base_config, mem_config) -> None:
    """Both models' output rows must cover the tokenizer; unlike JointGenerator's, their row counts may differ (the
    memory's rows beyond the tokenizer are dropped)."""
    checks.check_covers_tokenizer(settings.vocab, {"base": base_config.get_text_config().vocab_size,
                                                   "memory": mem_config.vocab_size})


def check_supported(vllm_config, settings: MemDecSettings, mem_config) -> None:
    """Refuse what the plugin does not support: pipeline parallelism, speculative decoding, a quantized base (the
    memory's layers would be built quantized), prompt embeddings with a Memory Decoder, micro-batch overlap with an
    MLP Memory (both micro-batches would share its tap), and a Memory Decoder with a shorter context than
    max_model_len."""
    parallel, model_config = vllm_config.parallel_config, vllm_config.model_config
    decoder = settings.memory_type == "decoder"
    refusals = [
        (parallel.pipeline_parallel_size > 1,
         (f"pipeline parallelism is not supported (pipeline_parallel_size={parallel.pipeline_parallel_size}); "
         "use tensor or data parallelism")),
        (getattr(vllm_config, "speculative_config", None) is not None,
         "speculative decoding is not supported; remove the speculative config"),
        (model_config.quantization is not None,  # set from the checkpoint or the arguments; quant_config comes later
         (f"a quantized base ({model_config.quantization}) is not supported: the memory's layers would be built "
         "quantized too; serve an unquantized base")),
        (decoder and getattr(model_config, "enable_prompt_embeds", False),
         ("prompt embeddings are not supported with a Memory Decoder, which reads token ids; turn "
         "enable_prompt_embeds off")),
        (not decoder and getattr(parallel, "use_ubatching", False),
         "dual batch overlap (micro-batching) is not supported with an MLP Memory; turn enable_dbo off"),
    ]
    for refused, why in refusals:
        if refused:
            raise ValueError(f"{ARCHITECTURE}: {why}")
    if decoder:
        positions = getattr(mem_config, "max_position_embeddings", None) or getattr(mem_config, "n_positions", None)
        if positions is not None and positions < model_config.max_model_len:
            raise ValueError(f"the Memory Decoder ({settings.memory}) has {positions} positions, fewer than "
                             f"max_model_len {model_config.max_model_len}: pass --max-model-len {positions} "
                             f"(LLM(max_model_len={positions})) or less")
    check_tensor_parallel(vllm_config, settings, mem_config)


def check_tensor_parallel(vllm_config, settings: MemDecSettings, mem_config) -> None:
    """The tensor-parallel size must divide the attention heads of the base and of a Memory Decoder (their KV heads
    too, or be a multiple of them: vLLM then replicates KV heads), or an MLP Memory's width."""
    tp = vllm_config.parallel_config.tensor_parallel_size
    models = [("base", vllm_config.model_config.model, vllm_config.model_config.hf_config.get_text_config())]
    if settings.memory_type == "decoder":
        models.append(("memory", settings.memory, mem_config))
    else:
        width = mem_config.n_inner or 4 * mem_config.n_embd
        if width % tp:
            raise ValueError(f"tensor_parallel_size {tp} does not divide the MLP Memory's {width} hidden units per "
                             f"block ({settings.memory}); pick a size that does")
    for who, where, config in models:
        heads = config.num_attention_heads
        kv = getattr(config, "num_key_value_heads", None) or heads
        if heads % tp:
            raise ValueError(f"tensor_parallel_size {tp} does not divide the {who}'s {heads} attention heads "
                             f"({where}); pick a size that does")
        if (kv % tp) if kv >= tp else (tp % kv):
            raise ValueError(f"tensor_parallel_size {tp} neither divides nor is a multiple of the {who}'s {kv} "
                             f"key-value heads ({where}); pick a size that is")


def settings_of(vllm_config):
    """Read and check a deployment's settings, everything but the weights: (MemDecSettings, the memory's config)."""
    model_config = vllm_config.model_config
    settings = read_settings(model_config.hf_config, model_config.model, model_config.tokenizer)
    mem_config = memory_config(settings)
    check_vocab(settings, model_config.hf_config, mem_config)
    check_supported(vllm_config, settings, mem_config)
    return settings, mem_config


def verify_deployment(vllm_config) -> None:
    """vLLM's config hook for MemDecForCausalLM: fail in the front-end process, before workers start; else log what
    will be served."""
    s, _ = settings_of(vllm_config)
    kind = "an MLP Memory" if s.memory_type == "mlp" else "a Memory Decoder"
    # under vLLM's logger, so that the line shows where vLLM's own do
    logging.getLogger("vllm.memdec_fast").info(
        "%s: %s (%s) with %s, %s; lmbda %g, knn_temp %g, mixing %d tokens", ARCHITECTURE, vllm_config.model_config.model,
        s.base_architecture, kind, s.memory, s.lmbda, s.knn_temp, s.vocab)
