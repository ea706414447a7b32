"""memdec_fast's vLLM plugin: serve a base causal LM with its Memory Decoder or MLP Memory on vLLM.

Installing memdec_fast registers the plugin through the ``vllm.general_plugins``
entry point; vLLM calls :func:`register` in each of its processes. Serve the base
checkpoint unchanged and name the memory in ``hf_overrides``::

    vllm serve gpt2-xl --hf-overrides '{"architectures": ["MemDecForCausalLM"],
                                        "memdec_memory": "Clover-Hill/MemoryDecoder-gpt2-small"}'

    LLM(model="gpt2-xl", hf_overrides={"architectures": ["MemDecForCausalLM"], "memdec_memory": "..."})

Optional keys: ``memdec_memory_type`` ("auto", "decoder", "mlp"), ``memdec_lmbda`` and
``memdec_knn_temp`` (default: the memory's stored values, as in JointGenerator).
Lambda and the memory's temperature are per deployment, not per request. See
:mod:`memdec_fast.vllm.model` for how the two models share vLLM's machinery, and
:mod:`memdec_fast.vllm.settings` for what is checked before any weight loads.
"""

from __future__ import annotations

ARCHITECTURE = "MemDecForCausalLM"


class MemDecConfigError(RuntimeError):
    """A deployment the plugin cannot serve, refused while vLLM builds its config: one sentence naming the problem.

    Not a ValueError: vLLM's config is a pydantic dataclass, which would wrap a ValueError in a validation report
    that dumps every engine argument around the sentence.
    """


def register() -> None:
    """Register MemDecForCausalLM with vLLM, and its deployment checks with vLLM's config hooks (idempotent)."""
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        # the string form: the model module (and CUDA) loads only where a model is built
        ModelRegistry.register_model(ARCHITECTURE, "memdec_fast.vllm.model:MemDecForCausalLM")
    try:
        from vllm.model_executor.models.config import MODELS_CONFIG_MAP, VerifyAndUpdateConfig
    except ImportError:  # an older or newer vLLM without the hook: the workers still run the same checks
        return
    hook = type("MemDecDeploymentCheck", (VerifyAndUpdateConfig,), {"verify_and_update_config": staticmethod(_verify)})
    MODELS_CONFIG_MAP.setdefault(ARCHITECTURE, hook)


def _verify(vllm_config) -> None:
    # imported here: vLLM loads every plugin in every process, and most deployments never build this model
    from memdec_fast.vllm.settings import verify_deployment

    try:
        verify_deployment(vllm_config)
    except ValueError as err:
        raise MemDecConfigError(str(err)) from None
