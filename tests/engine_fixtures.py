"""Shared helpers for the engine tests (imported by tests/test_engine_*.py)."""
from __future__ import annotations

import os

import torch

from cluster.engine.forward_batch import ForwardInput
from cluster.engine.loader import load_model
from cluster.engine.model_runner import ModelRunner
from cluster.sampling_params import SamplingParams

GREEDY = SamplingParams(max_tokens=1)
TINY_VOCAB = 512
# a tiny Llama for dummy weights (`tiny_llama_dir` in conftest.py); an untied random lm_head, so
# greedy outputs vary with the context (tied ones echo the input)
TINY_LLAMA = {"architectures": ["LlamaForCausalLM"], "vocab_size": TINY_VOCAB, "hidden_size": 64,
              "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 16, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
              "max_position_embeddings": 1024, "tie_word_embeddings": False, "bos_token_id": 1,
              "eos_token_id": 2}


def hf_gguf_location() -> tuple[str, str]:
    from cluster.engine.model_files import default_gguf_path
    path = default_gguf_path()
    return os.path.dirname(path), os.path.basename(path)


def prefill_input(ids: list[int], pages: list[int], prefix_len: int = 0, sample: bool = True,
                  return_logits: bool = False, bidirectional_len: int = 0) -> ForwardInput:
    """One request's extend forward of `ids` after `prefix_len` cached tokens."""
    return ForwardInput(input_ids=torch.tensor(ids, dtype=torch.int64), extend_lens=[len(ids)],
                        prefix_lens=[prefix_len], page_tables=[pages], sample=[sample], sampling=[GREEDY],
                        return_logits=return_logits, bidirectional_lens=[bidirectional_len])


def batch_input(chunks: list[list[int]], prefix_lens: list[int], page_tables: list[list[int]],
                is_decode: bool = False, sampling=None) -> ForwardInput:
    n = len(chunks)
    return ForwardInput(input_ids=torch.tensor([t for c in chunks for t in c], dtype=torch.int64),
                        extend_lens=[len(c) for c in chunks], prefix_lens=list(prefix_lens),
                        page_tables=[list(p) for p in page_tables], sample=[True] * n,
                        sampling=sampling or [GREEDY] * n, is_decode=is_decode)


def greedy_decode(runner, ids: list[int], num_tokens: int, pages: list[int]) -> list[int]:
    """Prefill `ids` then decode greedily one request alone."""
    out = runner.forward(prefill_input(ids, pages)).next_token_ids.tolist()
    for _ in range(num_tokens - 1):
        fi = batch_input([[out[-1]]], [len(ids) + len(out) - 1], [pages], is_decode=True)
        out.append(int(runner.forward(fi).next_token_ids[0]))
    return out


TINY_HF = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-6)


def save_tiny_hf(tmp_path, kind: str) -> tuple[str, object]:
    """A tiny random transformers model (`kind`: llama3, qwen2 or qwen3) saved as safetensors
    under tmp_path; -> (its directory, the model in eval mode)."""
    import transformers
    torch.manual_seed(0)
    if kind == "llama3":
        cfg = transformers.LlamaConfig(**TINY_HF, tie_word_embeddings=False, rope_theta=500000.0, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32})
        model = transformers.LlamaForCausalLM(cfg)
    elif kind == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**TINY_HF, tie_word_embeddings=True))
    else:
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**TINY_HF, tie_word_embeddings=False))
    with torch.no_grad():   # default init leaves biases / norms trivial: make them matter
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    path = str(tmp_path / kind)
    model.save_pretrained(path, safe_serialization=True)
    return path, model.eval()


class ByteTokenizer:
    """Dummy weights carry no tokenizer (and the GPU machine has no default model)."""
    eos_token_ids = frozenset()

    def encode(self, text):
        return [ord(c) % 1000 + 1 for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return ""


def tiny_cuda_runner(monkeypatch=None, **env):
    """A tiny-llama ModelRunner with dummy weights on CUDA, `env` set first (through monkeypatch)."""
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    loaded = load_model("tiny-llama", load_format="dummy", device="cuda")
    loaded._tokenizer = ByteTokenizer()
    return ModelRunner(loaded, 1024, 16, "cuda", "float32", max_decode_batch=96)
