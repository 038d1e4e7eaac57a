"""Registry, chat template and loading on the real demo model (CPU)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from conftest import MODELS_FILE, ROOT
from model_store.registry import Backend, ModelSpec, Registry, load_registry
from model_store.tokenizer import ChatTemplateError, ChatTokenizer, Message


@pytest.fixture(scope="module")
def registry() -> Registry:
    return load_registry(MODELS_FILE)


def test_the_registry_resolves_local_paths_and_keeps_hub_ids(registry, tmp_path):
    assert registry.default.name == "dawet-demo"
    assert registry.default.path == str((ROOT / "var/models/dawet-tiny").resolve())
    assert registry.get(None) is registry.default and registry.get("nope") is None
    (tmp_path / "m.toml").write_text('[[models]]\nname = "hub"\npath = "meta-llama/Llama-3.2-1B"\n')
    assert load_registry(tmp_path / "m.toml").default.path == "meta-llama/Llama-3.2-1B"


@pytest.mark.parametrize("entry,message", [
    ({"name": "bad name!", "path": "."}, "name"),
    ({"name": "m", "path": ".", "quantization": "3bit"}, "quantization"),
    ({"name": "m", "path": ".", "backend": "tensorrt"}, "backend"),
    ({"name": "m", "path": ".", "max_new_tokens_limit": 8}, "max_new_tokens_limit"),
    ({"name": "m", "path": ".", "unknown": 1}, "unknown"),
])
def test_bad_registry_entries_are_rejected(entry, message):
    with pytest.raises(ValidationError, match=message):
        ModelSpec(**entry)


def test_the_chat_template_renders_system_prompt_and_generation_prompt(registry):
    tokenizer = ChatTokenizer(registry.default.path)
    prompt = tokenizer.render([Message("user", "Halo")], system_prompt="Be brief.")
    assert prompt == ("<|begin_of_text|><|im_start|>system\nBe brief.<|im_end|>\n"
                      "<|im_start|>user\nHalo<|im_end|>\n<|im_start|>assistant\n")
    explicit = tokenizer.render([Message("system", "Own"), Message("user", "Halo")], "Be brief.")
    assert "Be brief." not in explicit and "Own" in explicit


def test_tokenizer_round_trips_text_and_knows_its_end_token(registry):
    tokenizer = ChatTokenizer(registry.default.path)
    text = "Saya suka makan nasi goreng, thank you!"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.encode("<|im_end|>")[0] in tokenizer.eos_token_ids


def test_a_template_that_raises_gives_a_chat_template_error(tmp_path, registry):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((Path(registry.default.path) / name).read_bytes())
    (tmp_path / "chat_template.jinja").write_text("{{ raise_exception('no system role') }}")
    with pytest.raises(ChatTemplateError, match="no system role"):
        ChatTokenizer(tmp_path).render([Message("user", "x")])


def test_importing_the_api_loads_no_model_code():
    code = "import sys, api; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=ROOT, check=True)
    assert result.stdout.strip() == "[]"


def test_auto_backend_is_transformers_on_cpu_and_quantization_needs_cuda(registry):
    import torch

    from model_store.loader import load_model, resolve_backend

    assert resolve_backend(registry.default, torch.device("cpu")) is Backend.TRANSFORMERS
    quantized = ModelSpec(**{**registry.default.model_dump(), "quantization": "4bit"})
    with pytest.raises(ValueError, match="needs a CUDA device"):
        load_model(quantized)


def test_every_setting_is_documented_in_the_readme():
    from dawet.settings import Settings

    readme = (ROOT / "README.md").read_text()
    missing = [f"DAWET_{name.upper()}" for name in Settings.model_fields
               if f"`DAWET_{name.upper()}`" not in readme]
    assert missing == []
