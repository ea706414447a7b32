"""`vllm serve` with the plugin answers the openai client with the tokens JointGenerator picks."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from plugin_setup import LMBDA, MAX_LEN, overrides

PROMPT = "the quick brown fox"
START_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(pairs, tmp_path_factory):
    """A `vllm serve` of the base and its Memory Decoder on 127.0.0.1, stopped after the module's tests."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "vllm_serve.log"
    cmd = [str(Path(sys.executable).with_name("vllm")), "serve", str(pairs["base"]),
           "--hf-overrides", json.dumps(overrides(pairs["decoder"], memdec_lmbda=LMBDA)),
           "--dtype", "float32", "--enforce-eager", "--max-model-len", str(MAX_LEN),
           "--host", "127.0.0.1", "--port", str(port)]
    if torch.cuda.is_available():  # the session's other engines hold part of the GPU
        cmd += ["--gpu-memory-utilization", "0.1"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=os.environ | {"VLLM_CPU_KVCACHE_SPACE": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vllm serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vllm serve did not answer in {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_completion_from_the_openai_client(server, pairs, generators):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=60)
    want = generators("decoder").generate(PROMPT, max_new_tokens=12)
    res = client.completions.create(model=str(pairs["base"]), prompt=PROMPT, max_tokens=12, temperature=0)
    assert res.choices[0].text == want.texts[0]
    streamed = client.completions.create(model=str(pairs["base"]), prompt=PROMPT, max_tokens=12, temperature=0,
                                         stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed) == want.texts[0]
