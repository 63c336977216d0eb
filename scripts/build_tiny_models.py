"""Build the tiny random-weight models the real-vLLM tests serve (no hub needed).

Run with the vLLM venv's Python (it has transformers, tokenizers and torch):

    .venv-vllm/bin/python scripts/build_tiny_models.py .cache/tiny-models

Writes ``tiny-llama/``: a 2-layer Llama (hidden 128, head_dim 64) with a byte-level BPE tokenizer
trained here on this repository's own text and a simple chat template. vLLM serves
the same weights for generation and, with ``--runner pooling``, for embeddings.
Idempotent: a complete model directory is left as it is.
"""
from __future__ import annotations

import sys
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL = ["<s>", "</s>", "<unk>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>"]


def corpus(repo: Path) -> list[str]:
    """Any local text will do; the repository's own docs and code are always there."""
    lines: list[str] = []
    for path in sorted(repo.glob("**/*")):
        if path.suffix in (".md", ".py") and ".venv" not in path.parts and ".cache" not in path.parts:
            lines.extend(path.read_text(errors="replace").splitlines())
    return [ln for ln in lines if ln.strip()][:20_000] or ["hello world"]


def build(out: Path, repo: Path) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    target = out / "tiny-llama"
    if (target / "config.json").exists() and (target / "tokenizer.json").exists() and any(
            target.glob("*.safetensors")):
        return target
    target.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2048, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(repo), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 2048
    fast.save_pretrained(target)
    torch.manual_seed(0)
    # head_dim 64: vLLM's CPU attention kernels refuse smaller heads (16 is "unsupported").
    config = LlamaConfig(vocab_size=len(fast), hidden_size=128, intermediate_size=256,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=2048, bos_token_id=fast.bos_token_id,
                         eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id,
                         tie_word_embeddings=False, torch_dtype="float32")
    model = LlamaForCausalLM(config)
    model.save_pretrained(target, safe_serialization=True)
    return target


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else ".cache/tiny-models").resolve()
    print(build(out, Path(__file__).resolve().parent.parent))
