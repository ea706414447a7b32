"""The README's vLLM snippet runs on vLLM's CPU build as written (hub names mapped to a tiny pair), and vLLM's
greedy tokens equal JointGenerator's."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import textwrap

import torch
from test_readme import fenced_blocks

THIS = "tests/vllm/test_readme_vllm.py"


def test_readme_vllm_snippet_gives_joint_generator_tokens(pairs, tmp_path):
    snippets = [code for lang, code, _, skip in fenced_blocks() if lang == "python" and skip and THIS in skip]
    assert len(snippets) == 1, f"expected one README snippet marked for {THIS}"
    code = textwrap.dedent(snippets[0])
    for name, path in (("Clover-Hill/MemoryDecoder-gpt2-small", pairs["decoder"]), ("gpt2", pairs["base"])):
        assert f'"{name}"' in code
        code = code.replace(f'"{name}"', f'"{path}"')
    if torch.cuda.is_available():  # the session's other engines hold part of the GPU
        code = code.replace("LLM(model=", "LLM(gpu_memory_utilization=0.1, model=")
    script = tmp_path / "readme_vllm.py"  # a file, as a user runs it: vLLM's engine process imports it again
    script.write_text(code)
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600, cwd=tmp_path,
                       env=os.environ | {"VLLM_CPU_KVCACHE_SPACE": "1"}, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    printed = [ast.literal_eval(line) for line in r.stdout.splitlines() if re.fullmatch(r"\[[\d, ]+\]", line)]
    assert len(printed) == 2, r.stdout[-3000:]
    vllm_tokens, memdec_tokens = printed
    print(vllm_tokens)
    assert len(vllm_tokens) == 16 and vllm_tokens == memdec_tokens
