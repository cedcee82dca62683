"""Shared pytest fixtures: an offline environment, a tiny in-test chat tokenizer, and the shared real assets.

Everything here runs without network: the hub switches are forced offline at import, the tiny tokenizer is trained
in-test, and fixtures over ../shared (the Qwen3 tokenizer, the real math data) skip cleanly when it is absent.
"""

import os

for _name, _value in [
    ("HF_HUB_OFFLINE", "1"),
    ("HF_DATASETS_OFFLINE", "1"),
    ("TRANSFORMERS_OFFLINE", "1"),
    ("WANDB_MODE", "disabled"),
    ("TOKENIZERS_PARALLELISM", "false"),
]:
    os.environ.setdefault(_name, _value)

import shutil  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"

_datasets_cache: str | None = None


def pytest_configure(config):
    # `datasets` converts every local file it loads into an Arrow cache; keep the tests' throwaway files out of the
    # user's ~/.cache/huggingface (set before any test module imports datasets, which reads it at import).
    global _datasets_cache
    if "HF_DATASETS_CACHE" not in os.environ:
        _datasets_cache = tempfile.mkdtemp(prefix="pytest-hf-datasets-")
        os.environ["HF_DATASETS_CACHE"] = _datasets_cache


def pytest_unconfigure(config):
    if _datasets_cache is not None:
        shutil.rmtree(_datasets_cache, ignore_errors=True)
        os.environ.pop("HF_DATASETS_CACHE", None)


TINY_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]

# ChatML like Qwen3's thinking variant: the generation prompt opens the think block, or (enable_thinking=False)
# inserts an empty one so the model answers directly.
TINY_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- else %}"
    "{{- '<think>\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)

_TRAINING_TEXT = [
    "What is 12 + 7? The answer is \\boxed{19}.",
    "Please reason step by step, and put your final answer within \\boxed{}.",
    "Let x = 3. Then 2x + 1 = 7, so the final answer is \\boxed{7}.",
    "The sum of 45 and 38 is 83. The difference of 90 and 27 is 63.",
    "We compute \\frac{1}{2} + \\frac{1}{3} = \\frac{5}{6}. Therefore the answer is 0123456789.",
    "A train travels 60 miles in 1.5 hours. How fast is it going? Speed = distance / time = 40 mph.",
]


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """A saved tiny byte-level BPE chat tokenizer (vocabulary <= 300, exact round trip of any text)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # Byte-level: every byte has a token, so any text round-trips exactly; no prefix space keeps decode(encode(s)) == s.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=TINY_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_TRAINING_TEXT, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>", "<think>", "</think>"],
    )
    fast.chat_template = TINY_CHAT_TEMPLATE
    path = tmp_path_factory.mktemp("tiny_tokenizer")
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir):
    """The tiny tokenizer loaded back from disk with AutoTokenizer (so the saved files are what is tested)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def qwen3_tokenizer():
    """The real Qwen3 tokenizer from ../shared/tokenizers/qwen3 (thinking-variant chat template), or skip."""
    path = SHARED / "tokenizers" / "qwen3"
    if not path.is_dir():
        pytest.skip(f"Qwen3 tokenizer not found at {path}")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real math data directory ../shared/data (see its README.md), or skip."""
    path = SHARED / "data"
    if not path.is_dir():
        pytest.skip(f"shared data not found at {path}")
    return path


# Tiny random models for the trainer's tests.


def tiny_model(vocab_size: int = 64, seed: int = 0, tie: bool = True):
    """A random 2-layer Qwen3 (hidden 32), fp32, in eval mode."""
    import torch as th
    from transformers import Qwen3Config, Qwen3ForCausalLM

    th.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_size=64,
        tie_word_embeddings=tie,
    )
    return Qwen3ForCausalLM(config).float().eval()


@pytest.fixture()
def tiny_model_dir(tmp_path, tiny_tokenizer):
    """A saved tiny model + tokenizer, with 4 embedding rows beyond the tokenizer as Qwen pads them."""
    path = tmp_path / "model"
    model = tiny_model(len(tiny_tokenizer) + 4, seed=1)  # padded beyond the tokenizer, like Qwen
    model.generation_config.eos_token_id = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def weights_of(ckpt: Path) -> dict:
    """A checkpoint's tensors by name."""
    from safetensors.torch import load_file

    return load_file(ckpt / "model.safetensors")
