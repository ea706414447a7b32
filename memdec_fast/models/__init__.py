"""Model runners: a lean GPT-2 and Llama family, a transformers fallback, and the memories."""

from memdec_fast.models.gpt2 import GPT2, GPT2Config
from memdec_fast.models.llama import Llama, LlamaConfig
from memdec_fast.models.mlp_memory import MLPMemory, detect_memory_type
from memdec_fast.models.runners import GPT2Runner, HFRunner, LeanRunner, LlamaRunner, as_runner, load_causal_lm

__all__ = [
    "GPT2", "GPT2Config", "GPT2Runner", "HFRunner", "LeanRunner", "Llama", "LlamaConfig", "LlamaRunner", "MLPMemory",
    "as_runner", "detect_memory_type", "load_causal_lm",
]
