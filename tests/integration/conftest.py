"""Fixtures of the integration tests that talk to a real server: the lively engine behind HTTP on 127.0.0.1,
an httpx client and an OpenAI client of it, and the transformers reference model. A module that needs another
server (another engine, a key) defines its own fixture of the same name."""

from __future__ import annotations

import httpx
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers.servers import start_server


@pytest.fixture(scope="module")
def server(engine, lively_checkpoint):
    background = start_server(engine, lively_checkpoint)
    yield background
    background.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def openai_client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def hf_lively(lively_checkpoint):
    return AutoModelForCausalLM.from_pretrained(lively_checkpoint, dtype=torch.float32).eval()
