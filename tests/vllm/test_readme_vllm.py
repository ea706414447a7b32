"""The README's vLLM snippet runs on vLLM's CPU build exactly as written (the embedded demo pair, the CPU memory
settings in the text itself), and vLLM's greedy tokens equal JointGenerator's."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import textwrap

from test_readme import fenced_blocks

THIS = "tests/vllm/test_readme_vllm.py"


def test_readme_vllm_snippet_gives_joint_generator_tokens(tmp_path):
    snippets = [code for lang, code, _, skip in fenced_blocks() if lang == "python" and skip and THIS in skip]
    assert len(snippets) == 1, f"expected one README snippet marked for {THIS}"
    script = tmp_path / "readme_vllm.py"  # a file, as a user runs it: vLLM's engine process imports it again
    script.write_text(textwrap.dedent(snippets[0]))
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_CPU")}  # only what the text sets
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600, cwd=tmp_path,
                       env=env, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    printed = [ast.literal_eval(line) for line in r.stdout.splitlines() if re.fullmatch(r"\[[\d, ]+\]", line)]
    assert len(printed) == 2, r.stdout[-3000:]
    vllm_tokens, memdec_tokens = printed
    print(vllm_tokens)
    assert vllm_tokens and vllm_tokens == memdec_tokens
