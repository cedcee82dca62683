"""Specification of data.py: field detection per dataset format, bad rows, prompts, and step-determined batches."""

import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from config import UsageError
from data import (
    DEFAULT_INSTRUCTION,
    Example,
    arithmetic_rows,
    build_examples,
    load_examples,
    load_rows,
    prompt_batch,
)


def write(tmp_path, rows: list[dict], fmt: str):
    """Write rows as a .json array, .jsonl or .parquet file and return its path as a string."""
    path = tmp_path / f"data.{fmt}"
    if fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def chat(*turns: tuple[str, str]) -> list[dict]:
    return [{"role": role, "content": content} for role, content in turns]


def pairs(rows: list[dict]) -> list[tuple[str, str]]:
    return [(r["problem"], r["answer"]) for r in rows]


# --- field detection, one small dataset per supported format ---------------------------------------------------


@pytest.mark.parametrize("fmt", ["json", "jsonl", "parquet"])
def test_deepscaler_problem_answer(tmp_path, fmt):
    rows = [
        {"problem": "What is $1+1$?", "solution": "So \\boxed{B}.", "answer": "2", "difficulty": 1.0},
        {"problem": " Find $x$. ", "solution": "x is \\boxed{7}", "answer": "-\\frac{2}{3}", "difficulty": 2.0},
    ]
    out = load_rows(write(tmp_path, rows, fmt))
    # `answer` wins over the solution's \boxed{}; text is stripped; index is the source row, `source` the row as read
    # (what reward functions see).
    assert out == [
        {"problem": "What is $1+1$?", "answer": "2", "index": 0, "source": rows[0]},
        {"problem": "Find $x$.", "answer": "-\\frac{2}{3}", "index": 1, "source": rows[1]},
    ]


def test_gsm8k_answer_after_hashes(tmp_path):
    rows = [
        {"question": "Janet has 3 eggs...", "answer": "She has 3 - 1 = <<3-1=2>>2 eggs.\n#### 2"},
        {"question": "How many cents?", "answer": "Work.\n#### 1,250 "},
    ]
    assert pairs(load_rows(write(tmp_path, rows, "jsonl"))) == [
        ("Janet has 3 eggs...", "2"),
        ("How many cents?", "1,250"),
    ]


def test_math_answer_falls_back_to_last_boxed_of_solution(tmp_path):
    rows = [
        {"problem": "p0", "solution": "First \\boxed{1}, finally \\boxed{\\frac{1}{2}}.", "answer": "\\frac12"},
        {"problem": "p1", "solution": "Thus $\\boxed{\\{1, 2\\}}$.", "answer": ""},
        {"problem": "p2", "solution": "Thus \\boxed{x^{2}}.", "answer": None},
    ]
    assert pairs(load_rows(write(tmp_path, rows, "jsonl"))) == [
        ("p0", "\\frac12"),
        ("p1", "\\{1, 2\\}"),
        ("p2", "x^{2}"),
    ]


def test_math_fallback_is_only_for_missing_or_empty_answers(tmp_path):
    rows = [
        {"problem": "p", "solution": "\\boxed{3}", "answer": "3"},
        {"problem": "q", "solution": "\\boxed{4}", "answer": None},
    ]
    rows[1]["answer"] = ["4"]  # a list answer is a bad row, not a reason to read the solution
    with pytest.raises(ValueError, match="row 1: field 'answer' is list"):
        load_rows(write(tmp_path, rows, "jsonl"))


def test_math_without_answer_column_uses_last_boxed(tmp_path):
    rows = [{"problem": "p", "solution": "a \\boxed{3} then \\boxed{\\sqrt{2}}"}]
    assert pairs(load_rows(write(tmp_path, rows, "jsonl"))) == [("p", "\\sqrt{2}")]


def test_deepmath_question_and_final_answer(tmp_path):
    # DeepMath-103K on the hub: question / final_answer (plus long r1 solutions, which must not be picked).
    rows = [{"question": "Evaluate $\\int_0^1 x\\,dx$.", "final_answer": "\\frac{1}{2}", "r1_solution_1": "..."}]
    assert pairs(load_rows(write(tmp_path, rows, "parquet"))) == [("Evaluate $\\int_0^1 x\\,dx$.", "\\frac{1}{2}")]


def test_deepmath_chat_prompt_prefers_final_answer_over_solution(tmp_path):
    rows = [
        {"prompt": chat(("user", "Compute 2^10.")), "final_answer": "1024", "solution": "1000"},
        {"prompt": chat(("user", "Compute 3^2.")), "final_answer": "9", "solution": "8"},
    ]
    assert pairs(load_rows(write(tmp_path, rows, "parquet"))) == [("Compute 2^10.", "1024"), ("Compute 3^2.", "9")]


def test_chat_prompt_with_short_solution_answer(tmp_path):
    rows = [{"prompt": chat(("user", "Compute 2^10.")), "solution": "1024"}]
    assert pairs(load_rows(write(tmp_path, rows, "jsonl"))) == [("Compute 2^10.", "1024")]


def test_rlvr_gsm_messages_last_user_message(tmp_path):
    msgs = chat(("system", "You are helpful."), ("user", "Q: 1+1?"), ("assistant", "2"), ("user", "Q: 2+2?"))
    rows = [{"messages": msgs, "ground_truth": "4", "dataset": "gsm8k"}]
    assert pairs(load_rows(write(tmp_path, rows, "jsonl"))) == [("Q: 2+2?", "4")]


@pytest.mark.parametrize("with_top_level", [True, False])
def test_verl_parquet(tmp_path, with_top_level):
    rows = [
        {
            "data_source": "deepscaler",
            "prompt": chat(("user", "Find f(2014). Output the final answer within \\boxed{}.")),
            "ability": "math",
            "reward_model": {"ground_truth": "- \\frac{1}{4}", "style": "rule"},
            "extra_info": {"index": 13660, "split": "train"},
        }
    ]
    if with_top_level:
        rows[0]["ground_truth"] = "- \\frac{1}{4}"
    out = load_rows(write(tmp_path, rows, "parquet"))
    assert pairs(out) == [("Find f(2014). Output the final answer within \\boxed{}.", "- \\frac{1}{4}")]


def test_explicit_fields_override_detection(tmp_path):
    rows = [{"problem": "ignored", "answer": "ignored", "q": "What is 6*7?", "meta": {"gold": 42}}]
    path = write(tmp_path, rows, "jsonl")
    assert pairs(load_rows(path, prompt_field="q", answer_field="meta.gold")) == [("What is 6*7?", "42")]


def test_explicit_field_not_in_columns(tmp_path):
    path = write(tmp_path, [{"problem": "p", "answer": "1"}], "jsonl")
    with pytest.raises(ValueError, match=r"\['nope'\].*columns"):
        load_rows(path, answer_field="nope")


def test_undetectable_schema_lists_columns_and_options(tmp_path):
    path = write(tmp_path, [{"text": "p", "label": "1"}], "jsonl")
    with pytest.raises(ValueError, match="problem field") as err:
        load_rows(path)
    for expected in ["'text'", "'label'", "--prompt-field", "--answer-field"]:
        assert expected in str(err.value)
    path = write(tmp_path, [{"problem": "p", "label": "1"}], "jsonl")
    with pytest.raises(ValueError, match="answer field"):
        load_rows(path)


def test_missing_file():
    with pytest.raises(UsageError, match="/nonexistent/data.jsonl: no such file"):
        load_rows("/nonexistent/data.jsonl")


def test_numeric_answers_become_strings(tmp_path):
    rows = [{"problem": "a", "answer": 142.0}, {"problem": "b", "answer": 3.5}]
    assert [r["answer"] for r in load_rows(write(tmp_path, rows, "json"))] == ["142.0", "3.5"]
    assert [r["answer"] for r in load_rows(write(tmp_path, [{"problem": "a", "answer": 7}], "json"))] == ["7"]


# --- bad rows ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad_row", "field"),
    [
        ({"problem": "p", "answer": None}, "answer"),  # missing answer (None in a json column)
        ({"problem": "   ", "answer": "1"}, "problem"),  # empty problem
        ({"problem": None, "answer": "1"}, "problem"),  # missing problem
        ({"problem": "p", "answer": ["1", "2"]}, "answer"),  # a list is not an answer
        ({"problem": "p", "answer": "  "}, "answer"),  # empty answer
    ],
)
def test_bad_row_error_names_row_and_field(tmp_path, bad_row, field):
    rows = [{"problem": "ok", "answer": "1"}, bad_row, {"problem": "ok2", "answer": "2"}]
    path = write(tmp_path, rows, "json")
    with pytest.raises(ValueError, match=rf"row 1: field '{field}'.*--skip-bad-rows"):
        load_rows(path)


def test_bad_row_dict_answer(tmp_path):
    rows = [{"problem": "p", "answer": "1"}, {"problem": "q", "answer": None}]
    rows[1]["answer"] = {"value": 1}  # a dict without ground_truth
    path = write(tmp_path, rows, "jsonl")
    with pytest.raises(ValueError, match="row 1: field 'answer' is dict"):
        load_rows(path)


def test_math_row_with_empty_boxed_is_bad(tmp_path):
    rows = [
        {"problem": "p0", "solution": "\\boxed{1}", "answer": "1"},
        {"problem": "p1", "solution": "\\boxed{}", "answer": ""},
    ]
    with pytest.raises(ValueError, match=r"row 1: field 'solution' has no non-empty \\boxed"):
        load_rows(write(tmp_path, rows, "jsonl"))


def test_skip_bad_rows_counts_and_logs(tmp_path, caplog):
    rows = [
        {"problem": "a", "answer": "1"},
        {"problem": "", "answer": "2"},
        {"problem": "c", "answer": "3"},
        {"problem": "d", "answer": None},
    ]
    with caplog.at_level(logging.INFO, logger="data"):
        out = load_rows(write(tmp_path, rows, "json"), skip_bad_rows=True)
    assert [(r["problem"], r["index"]) for r in out] == [("a", 0), ("c", 2)]
    assert "skipped 2 of 4 bad rows (first: row 1: field 'problem' is empty)" in caplog.text


def test_all_rows_bad_raises(tmp_path):
    with pytest.raises(ValueError, match="no usable rows"):
        load_rows(write(tmp_path, [{"problem": "", "answer": "1"}], "json"), skip_bad_rows=True)


# --- synthetic arithmetic -------------------------------------------------------------------------------------------


def test_arithmetic_rows_are_correct_and_deterministic():
    rows = arithmetic_rows(n=500, seed=3, max_operand=20)
    assert len(rows) == 500 and [r["index"] for r in rows] == list(range(500))
    ops = set()
    for r in rows:
        head, a, op, b = r["problem"].rstrip("?").split(" ")[-4:]
        assert head == "is" and r["problem"].startswith("What is ")
        a, b = int(a), int(b)
        assert 0 <= a <= 20 and 0 <= b <= 20
        assert int(r["answer"]) == (a + b if op == "+" else a - b) >= 0
        ops.add(op)
    assert ops == {"+", "-"}
    assert arithmetic_rows(n=500, seed=3) == rows
    assert arithmetic_rows(n=500, seed=4) != rows
    assert load_rows("arithmetic", split="validation") == arithmetic_rows()  # a split it lacks: no held-out problems


def test_arithmetic_train_and_test_splits_are_disjoint():
    train, test = load_rows("arithmetic:9"), load_rows("arithmetic:9", split="test")
    problems = {r["problem"] for r in test}
    assert len(problems) == len(test) == 33  # every held-out problem once: 1 in 5 of the 155 with operands ≤ 9
    assert not problems & {r["problem"] for r in train} and len(train) == 2000
    assert all(max(map(int, r["problem"].rstrip("?").split()[-3::2])) <= 9 for r in train + test)
    assert [r["index"] for r in test] == list(range(33))


# --- prompts ---------------------------------------------------------------------------------------------------------


def test_prompt_has_problem_instruction_and_generation_prompt(tiny_tokenizer):
    rows = [{"problem": "What is 12 + 7?", "answer": "19", "index": 5}]
    (ex,) = build_examples(rows, tiny_tokenizer)
    assert isinstance(ex, Example) and (ex.answer, ex.problem, ex.index) == ("19", "What is 12 + 7?", 5)
    text = tiny_tokenizer.decode(ex.prompt_ids)
    assert text == (
        f"<|im_start|>user\nWhat is 12 + 7?\n\n{DEFAULT_INSTRUCTION}<|im_end|>\n<|im_start|>assistant\n<think>\n"
    )
    assert ex.prompt_ids == tiny_tokenizer(text, add_special_tokens=False)["input_ids"]


def test_prompt_system_no_duplicate_instruction_and_no_thinking(tiny_tokenizer):
    rows = [{"problem": "Put 3 in \\boxed{}.", "answer": "3", "index": 0}]
    (ex,) = build_examples(rows, tiny_tokenizer, system_prompt="Be brief.", enable_thinking=False)
    assert tiny_tokenizer.decode(ex.prompt_ids) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nPut 3 in \\boxed{}.<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    (ex,) = build_examples([{"problem": "p", "answer": "3", "index": 0}], tiny_tokenizer, instruction="")
    assert "<|im_start|>user\np<|im_end|>" in tiny_tokenizer.decode(ex.prompt_ids)


def test_few_shot_examples_are_earlier_turns_with_the_instruction(tiny_tokenizer):
    rows = [{"problem": "What is 3 + 4?", "answer": "7", "index": 0}]
    shots = ("What is 31 + 45?", "31 + 45 = \\boxed{76}", "What is 9 - 2?", "9 - 2 = \\boxed{7}")
    (ex,) = build_examples(rows, tiny_tokenizer, few_shot=shots, instruction="Box it.", enable_thinking=False)
    assert tiny_tokenizer.decode(ex.prompt_ids) == (
        "<|im_start|>user\nWhat is 31 + 45?\n\nBox it.<|im_end|>\n<|im_start|>assistant\n31 + 45 = \\boxed{76}<|im_end|>\n"
        "<|im_start|>user\nWhat is 9 - 2?\n\nBox it.<|im_end|>\n<|im_start|>assistant\n9 - 2 = \\boxed{7}<|im_end|>\n"
        "<|im_start|>user\nWhat is 3 + 4?\n\nBox it.<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    with pytest.raises(
        UsageError, match=r"--few-shot: must be an even number of texts \(PROBLEM RESPONSE pairs\), got 3"
    ):
        build_examples(rows, tiny_tokenizer, few_shot=shots[:3])


def test_tokenizer_without_chat_template(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tok.chat_template = None
    with pytest.raises(ValueError, match="chat_template"):
        build_examples([{"problem": "p", "answer": "1", "index": 0}], tok)


def test_long_prompts_dropped_and_counted(tiny_tokenizer, caplog):
    rows = [
        {"problem": "What is 1 + 1?", "answer": "2", "index": 0},
        {"problem": "x " * 400, "answer": "1", "index": 1},
    ]
    short_len = len(build_examples(rows[:1], tiny_tokenizer)[0].prompt_ids)
    with caplog.at_level(logging.INFO, logger="data"):
        out = build_examples(rows, tiny_tokenizer, max_prompt_len=short_len)
    assert [e.index for e in out] == [0]
    assert f"dropped 1 of 2 prompts longer than --max-prompt-len {short_len} tokens" in caplog.text
    with pytest.raises(ValueError, match="no prompts left"):
        build_examples(rows, tiny_tokenizer, max_prompt_len=short_len - 1)


def test_qwen3_prompt_ends_inside_think_block(qwen3_tokenizer):
    think, end_think = 151667, 151668
    newline = qwen3_tokenizer("\n", add_special_tokens=False)["input_ids"]
    rows = [{"problem": "What is 2 + 3?", "answer": "5", "index": 0}]
    (ex,) = build_examples(rows, qwen3_tokenizer)
    assert ex.prompt_ids[-1 - len(newline) :] == [think, *newline]
    assert end_think not in ex.prompt_ids
    assert qwen3_tokenizer.decode(ex.prompt_ids).startswith("<|im_start|>user\nWhat is 2 + 3?\n\nPlease reason")
    # The shared template always opens <think>; enable_thinking=False closes the block as Qwen3's own template does.
    (ex,) = build_examples(rows, qwen3_tokenizer, enable_thinking=False)
    assert end_think in ex.prompt_ids
    assert qwen3_tokenizer.decode(ex.prompt_ids).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_load_examples_max_samples(tmp_path, tiny_tokenizer):
    rows = [{"problem": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(50)]
    path = write(tmp_path, rows, "jsonl")
    a = load_examples(path, tiny_tokenizer, max_samples=10, seed=1)
    assert len(a) == 10 and len({e.index for e in a}) == 10
    assert [e.index for e in a] == sorted(e.index for e in a)  # source order kept
    assert all(e.answer == str(e.index + 1) for e in a)
    assert load_examples(path, tiny_tokenizer, max_samples=10, seed=1) == a
    assert {e.index for e in load_examples(path, tiny_tokenizer, max_samples=10, seed=2)} != {e.index for e in a}
    assert len(load_examples(path, tiny_tokenizer, max_samples=1000)) == 50
    with pytest.raises(ValueError, match="--max-samples"):
        load_examples(path, tiny_tokenizer, max_samples=0)


# --- batches -----------------------------------------------------------------------------------------------------------


def fake_examples(n: int) -> list[Example]:
    return [Example(prompt_ids=[i], answer=str(i), problem=f"p{i}", index=i) for i in range(n)]


def indices(batch: list[Example]) -> list[int]:
    return [e.index for e in batch]


@pytest.mark.parametrize("world_size", [2, 4])
def test_ranks_are_disjoint_and_cover_the_global_batch(world_size):
    examples = fake_examples(37)
    for step in range(12):
        full = indices(prompt_batch(examples, step, 8, seed=5))
        shards = [
            indices(prompt_batch(examples, step, 8, seed=5, rank=r, world_size=world_size)) for r in range(world_size)
        ]
        assert all(len(s) == 8 // world_size for s in shards)
        assert sorted(sum(shards, [])) == sorted(full) and len(set(full)) == 8


def test_each_epoch_is_a_permutation_without_repeats():
    examples = fake_examples(37)  # 4 batches of 8 per epoch; 5 examples left out of each epoch
    for epoch in range(3):
        seen = sum((indices(prompt_batch(examples, epoch * 4 + i, 8)) for i in range(4)), [])
        assert len(seen) == len(set(seen)) == 32


def test_shuffle_is_determined_by_seed_and_epoch():
    examples = fake_examples(40)
    assert indices(prompt_batch(examples, 3, 8, seed=1)) == indices(prompt_batch(examples, 3, 8, seed=1))
    assert indices(prompt_batch(examples, 0, 8, seed=1)) != indices(prompt_batch(examples, 0, 8, seed=2))
    epoch0 = sum((indices(prompt_batch(examples, s, 8, seed=1)) for s in range(5)), [])
    epoch1 = sum((indices(prompt_batch(examples, s, 8, seed=1)) for s in range(5, 10)), [])
    assert sorted(epoch0) == sorted(epoch1) == list(range(40)) and epoch0 != epoch1


def test_prompt_batch_errors():
    examples = fake_examples(10)
    with pytest.raises(ValueError, match="divisible"):
        prompt_batch(examples, 0, 6, world_size=4)
    with pytest.raises(ValueError, match="usable problems"):
        prompt_batch(examples, 0, 12)
    with pytest.raises(ValueError, match="rank"):
        prompt_batch(examples, 0, 4, rank=2, world_size=2)


# --- the real files in ../shared/data -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "n_rows"),
    [
        ("gsm8k/test.jsonl", 1319),
        ("math/train.jsonl", 7500),
        ("deepscaler/deepscaler_803.json", 803),
        ("deepscaler/deepscaler_2000.parquet", 2000),
    ],
)
def test_real_files_detected(shared_data, name, n_rows):
    path = shared_data / name
    if not path.is_file():
        pytest.skip(f"{path} absent")
    rows = load_rows(str(path), skip_bad_rows=name.startswith("math"))
    bad = {5341, 5343} if name.startswith("math") else set()  # MATH rows whose solution ends in an empty \boxed{}
    assert [r["index"] for r in rows] == [i for i in range(n_rows) if i not in bad]
    assert all(isinstance(r["problem"], str) and r["problem"] for r in rows)
    assert all(isinstance(r["answer"], str) and r["answer"] for r in rows)


def test_real_math_empty_answers(shared_data):
    path = shared_data / "math" / "train.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} absent")
    with pytest.raises(ValueError, match=r"row 5341: field 'solution' has no non-empty \\boxed"):
        load_rows(str(path))
    # Rows 888 and 1011 have no `answer` but end in "$\boxed 2$" / "$\boxed 9$".
    by_index = {r["index"]: r["answer"] for r in load_rows(str(path), skip_bad_rows=True)}
    assert (by_index[888], by_index[1011]) == ("2", "9")
