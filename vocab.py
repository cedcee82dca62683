"""The reasoning vocabulary: a second copy of (part of) the vocabulary, usable only inside `<think> … </think>`.

Idea. The model gets n_r new ids after its n_s embedding rows: reasoning id n_s + i is a copy of standard id
source_ids[i], initialised with exactly the source's input-embedding row and output (unembedding) row (one shared
row when they are tied, as in Qwen3-0.6B). n_s is the number of embedding rows before expansion (151,936 for
Qwen3-0.6B), never the tokenizer's size (151,669) or base size (151,643): the rows beyond the tokenizer are padding.
A standard token may be copied several times; the k-th copy of a token has multiplicity k (standard ids: 0).
RL can then let the copies drift apart from their sources, giving the model a private vocabulary for reasoning.

Gating. Reasoning ids may be sampled only inside a think block: outside, their logits are -inf and nothing else
changes, so the answer the reward sees is always plain text. The state is "inside" after `<think>` and "outside"
after `</think>` (otherwise unchanged); `think_state` computes it for whole sequences (a cumulative max, no loop over
time), `step_state` advances it by one token while decoding, and `prompt_inside` reads it off a prompt (a thinking
chat template whose generation prompt ends with `<think>\\n` starts generation inside; an empty think block or no tag
at all starts outside). The gate therefore needs `<think>` and `</think>` as single tokens: `add_reasoning_vocab`
refuses (ValueError) a tokenizer without them (e.g. SmolLM2's) rather than guessing another delimiter, except for
the size-0 baseline, which always returns None: "no reasoning vocabulary" has one form, None.

Invariance and the offset. A copy has the same hidden-state contribution and the same output row as its source, so
at step 0 every instance of a copied token s (the source and its m_s copies) gets the same logit l_s. Without a
correction, inside think s would then carry (m_s + 1)x the weight of an uncopied token (with a partial copy of N
tokens, the first N tokens would be favoured). Subtracting log(1 + m_s) from every instance of s, inside think only,
gives each instance exp(l_s) / (1 + m_s), so the total over the instances is exp(l_s) and the distribution over
text (copies mapped back to their sources) equals the base model's exactly, for any selection of copies. Hidden
states are unchanged too, since a copy's input row equals its source's. The offset is part of the policy: apply
`adjust_logits` wherever the gate is applied, i.e. when sampling and in the training log-probs alike
(`offset=False` exists only for ablations).

Token choices. Only regular tokens are ever copied: ids below len(tokenizer) that are neither special tokens
(`all_special_ids`) nor added tokens (`added_tokens_decoder`, which holds `<think>`, `</think>`, `<|im_end|>`, tool
tags…), and never the padding rows beyond the tokenizer. `ALL_REGULAR` (-1) copies all of them in id order (the
research default); size 0 is the baseline: the model is left untouched and there is no map (None).

Persistence. `add_reasoning_vocab` stores the map in `model.config.reasoning_vocab` (and the config's vocab_size
becomes n_s + n_r), so every `save_pretrained` checkpoint carries it and reloads with plain
`AutoModelForCausalLM.from_pretrained`; `save_map` also writes `reasoning_token_map.json` beside it, and `load`
reads either. Source ids are stored run-length encoded ("source_runs": [[first, count], ...] stands for first,
first+1, …, first+count-1), so the full copy of Qwen3's vocabulary is one run instead of 151,643 numbers.
"""

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch as th

from config import UsageError
from sharding import full

ALL_REGULAR = -1  # `size` that copies every regular token of the tokenizer
MAP_FILE = "reasoning_token_map.json"
CONFIG_KEY = "reasoning_vocab"  # model.config attribute (and config.json key) holding the map
THINK, END_THINK = "<think>", "</think>"
MARK_OPEN, MARK_CLOSE = "⟦", "⟧"  # decode(mark=True) wraps each run of reasoning tokens in these


@dataclass(eq=False, repr=False)
class ReasoningVocab:
    """The map from reasoning ids to standard ids, the think gate and the logit offset (see the module docstring)."""

    standard_size: int  # n_s: embedding rows before expansion
    source_ids: th.Tensor  # (n_r,) long, on CPU: reasoning id n_s + i copies standard id source_ids[i]
    think_id: int
    end_think_id: int
    offset: bool = True  # subtract log(1 + m_s) from every instance of a copied token s inside think
    _cache: dict = field(default_factory=dict, init=False, compare=False)

    def __post_init__(self):
        src = th.as_tensor(self.source_ids, dtype=th.long).flatten().cpu().contiguous()
        n_s = int(self.standard_size)
        if n_s <= 0:
            raise ValueError(f"standard_size must be positive, got {n_s}")
        if len(src) == 0:
            raise ValueError("a reasoning vocabulary needs at least one copy (no reasoning vocabulary is None)")
        if int(src.min()) < 0 or int(src.max()) >= n_s:
            raise ValueError(f"source_ids must lie in [0, standard_size={n_s}), got range [{src.min()}, {src.max()}]")
        for name in ("think_id", "end_think_id"):
            tag = int(getattr(self, name))
            if not 0 <= tag < n_s:
                raise ValueError(f"{name}={tag} is not a standard id (standard_size={n_s})")
            if bool((src == tag).any()):
                raise ValueError(f"{name}={tag} is among source_ids: think tags must never be copied")
        if self.think_id == self.end_think_id:
            raise ValueError(f"think_id and end_think_id are both {self.think_id}")
        self.standard_size, self.source_ids = n_s, src
        self.think_id, self.end_think_id, self.offset = int(self.think_id), int(self.end_think_id), bool(self.offset)

    @property
    def size(self) -> int:
        """n_r, the number of reasoning ids."""
        return len(self.source_ids)

    @property
    def total_size(self) -> int:
        """V = n_s + n_r, the expanded model's vocabulary (embedding rows, logits width)."""
        return self.standard_size + self.size

    def copies(self) -> th.Tensor:
        """(n_s,) long: m_s, how many times each standard id is copied."""
        if "copies" not in self._cache:
            self._cache["copies"] = th.bincount(self.source_ids, minlength=self.standard_size)
        return self._cache["copies"]

    def biases(self, device=None, dtype=th.float32) -> tuple[th.Tensor, th.Tensor]:
        """The (V,) logit biases (inside, outside) on `device` in `dtype`, built once per device and dtype."""
        device = th.device(device if device is not None else "cpu")
        key = ("bias", device, dtype)
        if key not in self._cache:
            n_s = self.standard_size
            # float64 first, so that the offset is as exact as the target dtype allows
            inside = th.zeros(self.total_size, dtype=th.float64)
            if self.offset:
                per_standard = -th.log1p(self.copies().double())  # (n_s,) 0 for uncopied tokens
                inside[:n_s] = per_standard
                inside[n_s:] = per_standard[self.source_ids]
            outside = th.zeros(self.total_size, dtype=th.float64)
            outside[n_s:] = -math.inf
            self._cache[key] = (inside.to(device=device, dtype=dtype), outside.to(device=device, dtype=dtype))
        return self._cache[key]

    def adjust_logits(self, logits: th.Tensor, inside: th.Tensor) -> th.Tensor:
        """Gate and offset next-token logits (..., V) given the think state `inside` (...,) bool before the token.

        Outside think the reasoning ids get -inf and nothing else changes; inside, both vocabularies are allowed and
        each instance of a copied token s gets -log(1 + m_s) (if `offset`). One add of a cached bias; differentiable.
        """
        if logits.shape[-1] != self.total_size:
            raise ValueError(f"logits have {logits.shape[-1]} entries, expected n_s + n_r = {self.total_size}")
        if inside.shape != logits.shape[:-1] or inside.dtype != th.bool:
            want = tuple(logits.shape[:-1])
            raise ValueError(f"inside must be bool of shape {want}, got {inside.dtype} of shape {tuple(inside.shape)}")
        bias_in, bias_out = self.biases(logits.device, logits.dtype)
        return logits + th.where(inside[..., None], bias_in, bias_out)

    def think_state(self, ids: th.Tensor, start_inside: th.Tensor) -> th.Tensor:
        """(B, T) bool: the think state after each token of `ids` (B, T), from the state `start_inside` (B,) before.

        Vectorised: each tag is keyed by 2 * position + (1 if `<think>`), so the running maximum of the keys holds the
        last tag so far and its kind; positions with no tag yet keep `start_inside`.
        """
        is_open, is_close = ids == self.think_id, ids == self.end_think_id  # (B, T)
        pos = th.arange(1, ids.shape[1] + 1, device=ids.device)  # (T,) 1-based, so 0 means "no tag"
        key = th.where(is_open | is_close, 2 * pos + is_open.long(), 0)  # (B, T)
        last = key.cummax(dim=1).values if ids.shape[1] else key
        return th.where(last > 0, (last & 1).bool(), start_inside.to(ids.device, th.bool)[:, None])

    def step_state(self, inside: th.Tensor, tokens: th.Tensor) -> th.Tensor:
        """(B,) bool: the think state after `tokens` (B,) long, from the state `inside` (B,) before them."""
        return th.where(tokens == self.think_id, True, th.where(tokens == self.end_think_id, False, inside))

    def prompt_inside(self, prompt_ids: list[list[int]]) -> th.Tensor:
        """(B,) bool on CPU: True where the last think tag in a prompt is `<think>` (generation starts inside)."""
        return th.tensor([opens_think(ids, self.think_id, self.end_think_id) for ids in prompt_ids], dtype=th.bool)

    def _source_on(self, device) -> th.Tensor:
        key = ("source", th.device(device))
        if key not in self._cache:
            self._cache[key] = self.source_ids.to(device)
        return self._cache[key]

    def to_standard(self, ids: th.Tensor) -> th.Tensor:
        """`ids` with every reasoning id replaced by its source id; other ids unchanged."""
        n_s = self.standard_size
        if ids.numel() and int(ids.max()) >= self.total_size:
            raise ValueError(f"id {int(ids.max())} is beyond the expanded vocabulary (n_s + n_r = {self.total_size})")
        src = self._source_on(ids.device)[(ids - n_s).clamp(min=0)]
        return th.where(ids >= n_s, src, ids)

    def text_probs(self, probs: th.Tensor) -> th.Tensor:
        """(..., n_s + n_r) probabilities → (..., n_s): each copy's mass added to its source's, the distribution over
        text (what the reward reads)."""
        n_s = self.standard_size
        return probs[..., :n_s].index_add(-1, self._source_on(probs.device), probs[..., n_s:])

    def multiplicity(self, ids: th.Tensor) -> th.Tensor:
        """0 for standard ids, k for the k-th copy of a token (ordered by reasoning id); for viewers."""
        if "rank" not in self._cache:
            order = th.argsort(self.source_ids, stable=True)
            ordered = self.source_ids[order]
            first = th.searchsorted(ordered, ordered)  # index of the first copy of the same source
            rank = th.empty_like(self.source_ids)
            rank[order] = th.arange(self.size) - first + 1
            self._cache["rank"] = th.cat([th.zeros(self.standard_size, dtype=th.long), rank])
        return self._cache["rank"].to(ids.device)[ids]

    def decode(self, ids, tokenizer, mark: bool = False, **decode_kwargs) -> str:
        """Text of `ids` (list[int] or 1-D tensor), reasoning ids decoded as their source tokens.

        mark=True wraps each run of reasoning tokens in ⟦…⟧ (runs are detokenised separately, so a character whose
        bytes straddle a run boundary shows as U+FFFD). `decode_kwargs` go to `tokenizer.decode`.
        """
        ids = th.as_tensor(ids, dtype=th.long).flatten().cpu()
        text_ids = self.to_standard(ids).tolist()
        if not mark:
            return tokenizer.decode(text_ids, **decode_kwargs)
        is_reasoning = (ids >= self.standard_size).tolist()
        parts, start = [], 0
        for t in range(1, len(text_ids) + 1):
            if t == len(text_ids) or is_reasoning[t] != is_reasoning[start]:
                text = tokenizer.decode(text_ids[start:t], **decode_kwargs)
                parts.append(MARK_OPEN + text + MARK_CLOSE if is_reasoning[start] else text)
                start = t
        return "".join(parts)

    def stats(self, ids: th.Tensor, mask: th.Tensor, inside: th.Tensor) -> dict[str, float]:
        """Reasoning-vocabulary statistics of completions: ids, mask, inside (B, T), inside = state before each token.

        reasoning_frac: share of reasoning ids among the think tokens (valid tokens sampled inside think);
        reasoning_outside: number of reasoning ids sampled outside think (0 unless the gate is broken);
        think_len: mean over rows of the number of think tokens.
        """
        mask, inside = mask.bool(), inside.bool()
        think = mask & inside  # (B, T)
        reasoning = ids >= self.standard_size
        n_think = think.sum()
        return {
            "reasoning_frac": float((reasoning & think).sum() / n_think.clamp(min=1)),
            "reasoning_outside": float((reasoning & mask & ~inside).sum()),
            "think_len": float(think.sum(dim=1).float().mean()) if ids.shape[0] else 0.0,
        }

    def to_dict(self) -> dict:
        """JSON-ready map (source ids run-length encoded as [first, count] runs of consecutive ids)."""
        return {
            "standard_size": self.standard_size,
            "size": self.size,
            "source_runs": _runs(self.source_ids),
            "think_id": self.think_id,
            "end_think_id": self.end_think_id,
            "offset": self.offset,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "ReasoningVocab":
        """Inverse of to_dict; also accepts a plain "source_ids" list."""
        if "source_runs" in d:
            parts = [th.arange(first, first + count) for first, count in d["source_runs"]]
            src = th.cat(parts) if parts else th.zeros(0, dtype=th.long)
        elif "source_ids" in d:
            src = th.as_tensor(d["source_ids"], dtype=th.long)
        else:
            raise ValueError(f"reasoning vocabulary map has neither source_runs nor source_ids: keys {sorted(d)}")
        if "size" in d and d["size"] != len(src):
            raise ValueError(f"reasoning vocabulary map says size {d['size']} but lists {len(src)} source ids")
        return cls(d["standard_size"], src, d["think_id"], d["end_think_id"], d.get("offset", True))

    def __eq__(self, other) -> bool:
        return isinstance(other, ReasoningVocab) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        fields = f"standard_size={self.standard_size}, size={self.size}, think_id={self.think_id}"
        return f"ReasoningVocab({fields}, end_think_id={self.end_think_id}, offset={self.offset})"


def _runs(ids: th.Tensor) -> list[list[int]]:
    """[[first, count], ...] runs of consecutive increasing ids."""
    if len(ids) == 0:
        return []
    starts = th.ones(len(ids), dtype=th.bool)
    starts[1:] = ids[1:] != ids[:-1] + 1
    at = th.nonzero(starts).flatten()
    counts = th.diff(th.cat([at, th.tensor([len(ids)])]))
    return [[int(f), int(c)] for f, c in zip(ids[at].tolist(), counts.tolist(), strict=True)]


def opens_think(ids: list[int], think_id: int, end_think_id: int) -> bool:
    """Whether the last think tag in `ids` is `<think>`, i.e. what follows is inside a think block."""
    for tok in reversed(ids):
        if tok == think_id or tok == end_think_id:
            return tok == think_id
    return False


def think_tag_ids(tokenizer) -> tuple[int, int] | None:
    """(`<think>` id, `</think>` id) if the tokenizer has both as single tokens, else None."""
    vocab = tokenizer.get_vocab()
    ids = vocab.get(THINK), vocab.get(END_THINK)
    if ids[0] is None or ids[1] is None:
        return None
    for tag, i in zip((THINK, END_THINK), ids, strict=True):
        if tokenizer.encode(tag, add_special_tokens=False) != [i]:
            return None  # in the vocabulary but not produced as one token (not registered as added): unusable
    return ids


# Appended to a chat template that does not open the think block: the generation prompt then ends with "<think>\n", as
# with Qwen3's thinking templates (and not with enable_thinking=False).
OPEN_THINK_TEMPLATE = (
    "{%- if add_generation_prompt and (enable_thinking is not defined or enable_thinking) %}"
    "{{- '" + THINK + "\\n' }}{%- endif %}"
)


def check_tied(model):
    """`model`, after checking that a config that ties the output layer to the embeddings holds one tensor for both
    (loaded, resized or copied: an untied pair would train two matrices and save one)."""
    tied = getattr(model.config.get_text_config(), "tie_word_embeddings", False)
    out = model.get_output_embeddings()
    if tied and out is not None and out.weight is not model.get_input_embeddings().weight:
        raise RuntimeError(f"{type(model).__name__}: tie_word_embeddings is set but the output layer is a copy")
    return model


def resize_rows(model, rows: int) -> None:
    """Resize the embeddings (and the output layer) to `rows` rows in place, for the caller to fill the new ones; a
    tied pair must stay one tensor (transformers re-ties it after a resize: checked, as its behaviour, not ours)."""
    model.resize_token_embeddings(rows, mean_resizing=False)
    check_tied(model)


def add_think_tags(model, tokenizer) -> bool:
    """Give a tokenizer without think tags (SmolLM2's) `<think>` and `</think>` as special tokens, so that a reasoning
    vocabulary can be gated. Each tag's new embedding row (and untied output row) copies its text's first piece's,
    W[tag] = W[encode(tag)[0]] ("</" for "</think>"): the model reads the tag as the start of its text and writes it
    as often as it would start writing that text (on SmolLM2, docs/demo.md: 39 % of replies then close the block after
    a worked example shows one; with the mean of the pieces' rows none did at step 0). The chat template's generation
    prompt opens the block (see OPEN_THINK_TEMPLATE). Returns False, changing nothing, when the tokenizer has both."""
    if think_tag_ids(tokenizer) is not None:
        return False
    first_piece = {tag: tokenizer.encode(tag, add_special_tokens=False)[0] for tag in (THINK, END_THINK)}
    tokenizer.add_tokens([THINK, END_THINK], special_tokens=True)
    ids = [tokenizer.convert_tokens_to_ids(tag) for tag in (THINK, END_THINK)]
    if max(ids) >= model.get_input_embeddings().weight.shape[0]:
        resize_rows(model, max(ids) + 1)
    layers = {model.get_input_embeddings().weight, model.get_output_embeddings().weight}  # one when tied
    with th.no_grad():
        for weight in layers:
            for tag, i in zip((THINK, END_THINK), ids, strict=True):
                weight[i] = weight[first_piece[tag]]
    tokenizer.chat_template = (tokenizer.chat_template or "") + OPEN_THINK_TEMPLATE
    return True


def regular_token_ids(tokenizer) -> list[int]:
    """Ids of the regular tokens, ascending: in the tokenizer (< len(tokenizer)), not special, not added."""
    excluded = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    n = len(tokenizer)
    return sorted(i for i in set(tokenizer.get_vocab().values()) if i < n and i not in excluded)


def add_reasoning_vocab(
    model, tokenizer, size: int, *, source_ids: list[int] | None = None, offset: bool = True
) -> ReasoningVocab | None:
    """Expand `model` in place with copies of regular tokens and return the map.

    size: how many regular tokens to copy, the first ones in id order (ALL_REGULAR = -1: all of them; 0: the
    baseline, the model is left untouched and None is returned). `source_ids` (repeats allowed, giving
    multiplicities > 1) overrides `size`. Raises ValueError for a tokenizer without think tags, except with nothing
    to copy (None). The map goes into model.config.reasoning_vocab and vocab_size becomes n_s + n_r.
    """
    emb = model.get_input_embeddings()
    n_s = emb.weight.shape[0]
    if getattr(model.config, CONFIG_KEY, None) is not None:
        raise ValueError(f"the model already has a reasoning vocabulary ({CONFIG_KEY} in its config)")
    if len(tokenizer) > n_s:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the model only {n_s} embedding rows")

    tags = think_tag_ids(tokenizer)
    if source_ids is None and not isinstance(size, int):
        raise ValueError(f"size must be an int (ALL_REGULAR = -1, 0 for the baseline), got {size!r}")
    nothing = len(source_ids) == 0 if source_ids is not None else size == 0
    if tags is None:
        if nothing:
            return None
        raise UsageError(
            f"--reasoning-vocab-size {size}: the reasoning vocabulary is gated by think tags ({THINK} ... {END_THINK})"
            f" and this tokenizer has none as single tokens ({type(tokenizer).__name__}, {len(tokenizer)} tokens); "
            "use --reasoning-vocab-size 0 (the baseline)"
        )

    regular = regular_token_ids(tokenizer)
    if source_ids is not None:
        allowed = set(regular)
        bad = [i for i in source_ids if not isinstance(i, int) or i not in allowed]
        if bad:
            raise ValueError(
                f"source_ids must be regular token ids (< len(tokenizer) = {len(tokenizer)}, not special or added); "
                f"invalid: {bad[:10]}{' ...' if len(bad) > 10 else ''}"
            )
        chosen = list(source_ids)
    elif size == ALL_REGULAR:
        chosen = regular
    elif 0 <= size <= len(regular):
        chosen = regular[:size]
    else:
        raise UsageError(
            f"--reasoning-vocab-size {size}: must be -1 (all) or in [0, {len(regular)}] (the regular tokens)"
        )

    if not chosen:
        return None
    vocab = ReasoningVocab(n_s, th.tensor(chosen, dtype=th.long), tags[0], tags[1], offset)

    out = model.get_output_embeddings()
    if out is not None and out.weight.shape[0] != n_s:
        raise ValueError(f"output layer has {out.weight.shape[0]} rows but the input embedding {n_s}")
    resize_rows(model, vocab.total_size)
    emb, out = model.get_input_embeddings(), model.get_output_embeddings()
    with th.no_grad():
        src = vocab.source_ids.to(emb.weight.device)
        emb.weight[n_s:] = emb.weight[src]
        if out is not None and out.weight.data_ptr() != emb.weight.data_ptr():  # untied: copy the output rows too
            out.weight[n_s:] = out.weight[src.to(out.weight.device)]
            if getattr(out, "bias", None) is not None:
                out.bias[n_s:] = out.bias[src.to(out.bias.device)]
    setattr(model.config, CONFIG_KEY, vocab.to_dict())
    text_config = model.config.get_text_config()
    if text_config.vocab_size != vocab.total_size:
        text_config.vocab_size = vocab.total_size
    return vocab


def save_map(vocab: ReasoningVocab, directory) -> None:
    """Write directory/reasoning_token_map.json atomically (a temporary file, then os.replace)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{MAP_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(vocab.to_dict(), indent=1) + "\n")
    os.replace(tmp, directory / MAP_FILE)


def load(path_or_model) -> ReasoningVocab | None:
    """The map of a checkpoint directory (its reasoning_token_map.json, else its config.json), of a map or config
    file, or of a loaded model (its config); None when there is none."""
    if not isinstance(path_or_model, (str, os.PathLike)):
        d = getattr(path_or_model.config, CONFIG_KEY, None)
        if d is None:
            return None
        vocab = ReasoningVocab.from_dict(d)
        rows = path_or_model.get_input_embeddings().weight.shape[0]
        if rows != vocab.total_size:
            raise ValueError(f"model has {rows} embedding rows but its reasoning vocabulary needs {vocab.total_size}")
        return vocab

    path = Path(path_or_model)
    if path.is_dir():
        if (path / MAP_FILE).is_file():
            return _check_config(ReasoningVocab.from_dict(json.loads((path / MAP_FILE).read_text())), path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} has neither {MAP_FILE} nor config.json")
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no reasoning vocabulary map or checkpoint at {path}")
    d = json.loads(path.read_text())
    if "standard_size" in d:  # a map file
        return ReasoningVocab.from_dict(d)
    if d.get(CONFIG_KEY) is None:  # a config without a reasoning vocabulary
        return None
    return _check_config(ReasoningVocab.from_dict(d[CONFIG_KEY]), path.parent)


def _check_config(vocab: ReasoningVocab, directory: Path) -> ReasoningVocab:
    """The vocab, after checking it against the vocab_size in directory/config.json when there is one."""
    config_file = directory / "config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text())
        size = config.get("vocab_size", config.get("text_config", {}).get("vocab_size"))
        if size is not None and size != vocab.total_size:
            raise ValueError(f"{config_file} has vocab_size {size} but the reasoning map needs {vocab.total_size}")
    return vocab


def embed_drift(model, vocab: ReasoningVocab) -> dict[str, float]:
    """Mean L2 distance of each copy's row from its source's row: embed_drift (input embedding) and, for untied
    models, unembed_drift (output layer)."""

    def mean_drift(weight: th.Tensor) -> float:
        return float(row_drift(weight, vocab).double().mean()) if vocab.size else 0.0

    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    result = {"embed_drift": mean_drift(full(emb))}  # a sharded model's gathered (every rank calls this)
    if out is not None and out.weight is not emb:
        result["unembed_drift"] = mean_drift(full(out.weight))
    return result


@th.no_grad()
def row_drift(weight: th.Tensor, vocab: ReasoningVocab, chunk: int = 16384) -> th.Tensor:
    """(n_r,) d_i = ‖weight[n_s + i] − weight[source_ids[i]]‖₂ for a (V, hidden) weight, in float32."""
    n_s, src, parts = vocab.standard_size, vocab.source_ids.to(weight.device), []
    for i in range(0, vocab.size, chunk):  # chunks bound the float32 temporaries for a full copy of a large vocabulary
        copies = weight[n_s + i : n_s + i + chunk].float()  # (chunk, hidden)
        parts.append((copies - weight[src[i : i + chunk]].float()).norm(dim=1))
    return th.cat(parts) if parts else th.zeros(0, device=weight.device)
