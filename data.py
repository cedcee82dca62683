"""Math datasets to chat-templated prompts, and the deterministic per-step prompt batches GRPO trains on.

Pipeline: `load_rows` reads a dataset (a HF hub id, a local .json/.jsonl/.parquet file, or "arithmetic[:N]", the
synthetic data of the offline demo, operands 0 … N, with disjoint "train" and "test" splits) into `{"problem", "answer", "index"}` rows, detecting the problem and answer
fields of the common math-RL formats:

| format                          | problem field                     | answer field                                         |
|---------------------------------|-----------------------------------|------------------------------------------------------|
| DeepScaleR, MATH, AIME          | `problem`                         | `answer` (MATH: else the last \\boxed{} of `solution`) |
| GSM8K                           | `question`                        | `answer`, the text after `#### `                     |
| DeepMath-103K                   | `question` or `prompt` (chat)     | `final_answer`, else `solution`                      |
| allenai/RLVR-GSM                | `messages` (chat)                 | `ground_truth`                                       |
| verl parquet                    | `prompt` (chat)                   | `ground_truth` or `reward_model.ground_truth`        |

A chat-list prompt's problem is its last user message. `build_examples` wraps each problem in the tokenizer's chat
template (optional system prompt; the boxed-answer instruction appended unless the problem already asks for
\\boxed) and drops prompts longer than `max_prompt_len`, counting them. `prompt_batch` maps a training step to its
prompts: a seeded permutation per epoch, cut into global batches, each split across ranks; the step alone fixes the
data position, so resuming needs nothing else.
"""

import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch as th

from config import DEFAULT_INSTRUCTION, UsageError, few_shot_rule, flag
from reward import extract_boxed

log = logging.getLogger(__name__)

# Detection order: the first column present wins. `solution` is last among answers because in MATH and DeepScaleR
# it is a full worked solution (used only through its last \boxed{}), while DeepMath-style data may store the
# short answer there.
PROBLEM_FIELDS = ("problem", "question", "prompt", "messages")
ANSWER_FIELDS = ("answer", "final_answer", "ground_truth", "reward_model", "solution")


@dataclass(frozen=True)
class Example:
    prompt_ids: list[int]  # chat-templated prompt token ids
    answer: str  # gold answer (LaTeX fragment, as reward.accuracy_reward expects)
    problem: str  # the problem text (for logs / sample tables)
    index: int  # row index in the source dataset
    row: dict = field(default_factory=dict, compare=False)  # the source row, every field (what reward functions read)


class _BadRow(ValueError):
    """A row whose problem or answer is unusable (the message names the field)."""


def arithmetic_rows(n: int = 2000, seed: int = 0, max_operand: int = 20, split: str | None = None) -> list[dict]:
    """Synthetic "What is a + b?" / "What is a - b?" problems with exact integer answers (never negative), operands
    in [0, max_operand]. split None: n random problems; "train": n random problems outside the test split; "test":
    every problem of the held-out split (about 1 in 5, fixed by `held_out`), once each, in order."""
    if split == "test":
        problems = [(a, "+", b) for a in range(max_operand + 1) for b in range(max_operand + 1)]
        problems += [(a, "-", b) for a in range(max_operand + 1) for b in range(a + 1)]
        held = [(a, op, b) for a, op, b in problems if held_out(a, op, b)]
        return [{"problem": f"What is {a} {op} {b}?", "answer": str(a + b if op == "+" else a - b), "index": i}
                for i, (a, op, b) in enumerate(held)]  # fmt: skip
    rng = random.Random(seed)
    rows = []
    while len(rows) < n:
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        op = "+" if rng.random() < 0.5 else "-"
        if op == "-":
            a, b = max(a, b), min(a, b)
        if split == "train" and held_out(a, op, b):
            continue
        answer = a + b if op == "+" else a - b
        rows.append({"problem": f"What is {a} {op} {b}?", "answer": str(answer), "index": len(rows)})
    return rows


def held_out(a: int, op: str, b: int) -> bool:
    """Whether the problem a op b belongs to the arithmetic test split (a fixed hash: about 1 problem in 5)."""
    return (7 * a + 13 * b + (3 if op == "-" else 0)) % 5 == 0


def _load_dataset(source: str, split: str, skip_bad_rows: bool) -> tuple[list[dict] | Any, list[str], int]:
    """(rows, column names, lines skipped) of a local file or a hub dataset (id, or "id:config")."""
    path = Path(source)
    if path.suffix in (".json", ".jsonl"):
        rows, skipped = _read_json_rows(path, skip_bad_rows)
        if split != "train":  # a local file is one split, "train"; datasets' slices ("train[:100]") still apply
            import datasets

            try:
                (cut,) = datasets.ReadInstruction.from_spec(split).to_absolute({"train": len(rows)})
            except ValueError:
                raise UsageError(f"{source}: a local file has one split, 'train' (or a slice such as 'train[:100]'), "
                                 f"not {split!r}") from None  # fmt: skip
            rows = rows[cut.from_ : cut.to]
        return rows, list(dict.fromkeys(k for row in rows for k in row)), skipped
    import datasets

    try:
        if path.suffix == ".parquet":
            if not path.is_file():
                raise UsageError(f"{source}: no such file")
            ds = datasets.load_dataset("parquet", data_files=str(path), split=split)
        else:  # Hub ids cannot contain ":", so "openai/gsm8k:main" names a config.
            name, _, config = source.partition(":")
            ds = datasets.load_dataset(name, config or None, split=split)
    except UsageError:
        raise
    except Exception as e:  # datasets' own errors are long and name neither the file nor what to do
        what = "read it as parquet" if path.suffix == ".parquet" else f"load split {split!r} of it from the hub"
        raise UsageError(f"{source}: cannot {what} ({type(e).__name__}: {str(e).strip().splitlines()[0][:200]})") from e
    return ds, list(ds.column_names), 0


def _read_json_rows(path: Path, skip_bad_rows: bool) -> tuple[list[dict], int]:
    """The objects of a .json array or of JSON lines (.jsonl, or .json that is not one array), and how many lines
    were skipped. A line that is not a JSON object is an error naming the file and line, or is skipped and counted."""
    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise UsageError(f"{path}: the file is empty")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path} line {e.lineno}: not valid JSON ({e.msg})") from None
        if bad := [i for i, row in enumerate(rows) if not isinstance(row, dict)]:
            raise UsageError(f"{path}: item {bad[0]} of the array is not an object")
        return rows, 0
    rows, bad = [], []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            problem = None if isinstance(row, dict) else f"a JSON {type(row).__name__}, not an object"
        except json.JSONDecodeError as e:
            problem = f"not valid JSON ({e.msg}, column {e.colno})"
        if problem is None:
            rows.append(row)
        elif skip_bad_rows:
            bad.append(f"line {lineno}: {problem}")
        else:
            raise UsageError(f"{path} line {lineno}: {problem} (--skip-bad-rows skips such lines)")
    if bad:
        log.warning(f"{path}: skipped {len(bad)} unparseable line(s) (first: {bad[0]})")
    return rows, len(bad)


def _problem_text(value: Any, field: str) -> str:
    if isinstance(value, list):  # a chat: [{"role": ..., "content": ...}, ...]
        users = [m for m in value if isinstance(m, dict) and m.get("role") == "user"]
        if not users:
            raise _BadRow(f"field {field!r} is a list with no user message")
        value = users[-1].get("content")
    if not isinstance(value, str):
        raise _BadRow(f"field {field!r} is {type(value).__name__}, not a string or a chat list")
    if not value.strip():
        raise _BadRow(f"field {field!r} is empty")
    return value.strip()


def _answer_text(value: Any, field: str) -> str:
    if isinstance(value, dict) and "ground_truth" in value:  # verl's reward_model = {"ground_truth": ..., "style": ...}
        value, field = value["ground_truth"], f"{field}.ground_truth"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)  # some datasets store numeric answers as floats; the reward handles "142.0"
    if not isinstance(value, str):
        raise _BadRow(f"field {field!r} is {type(value).__name__}, not a string or a number")
    if "####" in value:  # GSM8K: a worked solution ending in "#### <final answer>"
        value = value.rsplit("####", 1)[1]
    if not value.strip():
        raise _BadRow(f"field {field!r} is empty")
    return value.strip()


def _boxed_answer(solution: Any, field: str) -> str:
    boxed = extract_boxed(solution) if isinstance(solution, str) else None
    if boxed is None or not boxed.strip():
        raise _BadRow(f"field {field!r} has no non-empty \\boxed{{}} answer")
    return boxed.strip()


def _row_answer(row: dict, field: str, has_solution: bool) -> tuple[str, bool]:
    """(answer, whether it came from the last \\boxed{} of `solution`)."""
    # MATH: `solution` is a worked solution ending in \boxed{}, and `answer` is empty in a few rows (or absent in
    # some copies). A `solution` without \boxed (DeepMath-style) is taken as the answer itself.
    if field == "solution":
        value = _get(row, field)
        if isinstance(value, str) and "\\boxed" in value:
            return _boxed_answer(value, field), True
        return _answer_text(value, field), False
    value = row.get(field)
    if field == "answer" and has_solution and (value is None or (isinstance(value, str) and not value.strip())):
        return _boxed_answer(row.get("solution"), "solution"), True
    return _answer_text(_get(row, field), field), False


def _get(row: dict, field: str) -> Any:
    """row[field], where "a.b" reaches into a dict column; a missing key is a bad row."""
    value: Any = row
    for key in field.split("."):
        if not isinstance(value, dict) or key not in value:
            raise _BadRow(f"field {field!r} is missing")
        value = value[key]
    if value is None:
        raise _BadRow(f"field {field!r} is missing (None)")
    return value


def load_rows(
    source: str,
    *,
    split: str = "train",
    prompt_field: str | None = None,
    answer_field: str | None = None,
    skip_bad_rows: bool = False,
) -> list[dict]:
    """Rows {"problem": str, "answer": str, "index": int, "source": the row as read} from a hub id, a local
    json/jsonl/parquet file or "arithmetic".

    Fields are detected (see the module docstring) unless `prompt_field` / `answer_field` name them; a dotted name
    ("reward_model.ground_truth") reaches into a dict column. A bad row (missing field, empty problem, answer that is
    not a string or number) raises a UsageError naming the row and field, or with `skip_bad_rows` is skipped and
    counted in a log line.
    """
    if source == "arithmetic" or source.startswith("arithmetic:"):  # "arithmetic:9": operands 0 … 9
        max_operand = int(source.partition(":")[2] or 20)
        return arithmetic_rows(max_operand=max_operand, split=split if split in ("train", "test") else None)
    ds, columns, skipped_lines = _load_dataset(source, split, skip_bad_rows)
    if not columns:
        raise UsageError(
            f"{source}: no rows" + (f" ({skipped_lines} unparseable lines skipped)" if skipped_lines else "")
        )
    top = {field.split(".")[0] for field in (prompt_field, answer_field) if field}
    if missing := sorted(top - set(columns)):
        raise UsageError(f"{source}: field(s) {missing} not among the columns {columns}")
    p_field = prompt_field or next((f for f in PROBLEM_FIELDS if f in columns), None)
    a_field = answer_field or next((f for f in ANSWER_FIELDS if f in columns), None)
    if p_field is None or a_field is None:
        raise UsageError(
            f"{source}: cannot detect the {'problem' if p_field is None else 'answer'} field among the columns "
            f"{columns}; known problem fields {list(PROBLEM_FIELDS)}, answer fields {list(ANSWER_FIELDS)}; "
            "name it with --prompt-field / --answer-field (a dotted name reaches into a dict column)"
        )
    rows, bad, n_boxed = [], [], 0
    for index, row in enumerate(ds):
        try:
            problem = _problem_text(_get(row, p_field), p_field)
            answer, from_boxed = _row_answer(row, a_field, "solution" in columns)
            n_boxed += from_boxed
        except _BadRow as e:
            if not skip_bad_rows:
                raise UsageError(f"{source}: row {index}: {e} (--skip-bad-rows skips such rows)") from None
            bad.append(f"row {index}: {e}")
            continue
        rows.append({"problem": problem, "answer": answer, "index": index, "source": dict(row)})
    log.info(f"{source}: {len(rows)} rows, problem from {p_field!r}, answer from {a_field!r}")
    if n_boxed:
        log.info(f"{source}: {n_boxed} answers taken from the last \\boxed{{}} of 'solution'")
    if bad:
        log.warning(f"{source}: skipped {len(bad)} of {len(ds)} bad rows (first: {bad[0]})")
    if not rows:
        raise UsageError(
            f"{source}: no usable rows" + (f" ({skipped_lines} unparseable lines skipped)" if skipped_lines else "")
        )
    return rows


def build_examples(
    rows: list[dict],
    tokenizer,
    *,
    system_prompt: str | None = None,
    instruction: str = DEFAULT_INSTRUCTION,
    few_shot: tuple[str, ...] = (),
    enable_thinking: bool = True,
    max_prompt_len: int = 1024,
) -> list[Example]:
    """Chat-template each row's problem into prompt ids; prompts over `max_prompt_len` tokens are dropped and counted.

    `few_shot` (problem, response, problem, response, ...) become earlier user and assistant turns, each problem with
    the instruction appended as to the row's own: a small model copies the responses' form. Templates that strip
    earlier turns' reasoning (Qwen3's) keep only a response's text after </think>.

    With enable_thinking=False and a template that always opens the think block (the thinking-only variant of
    Qwen3's template ignores the flag), the block is closed as Qwen3's own template does: "<think>\\n\\n</think>\\n\\n".
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no chat_template; use an instruct/chat tokenizer")
    name, holds, allowed = few_shot_rule(few_shot)
    if not holds:
        raise UsageError(f"{flag(name)}: must be {allowed}")

    def ask(problem: str) -> dict:
        if instruction and "\\boxed" not in problem:
            problem = f"{problem}\n\n{instruction}"
        return {"role": "user", "content": problem}

    shots = [ask(text) if i % 2 == 0 else {"role": "assistant", "content": text} for i, text in enumerate(few_shot)]
    texts = []
    for row in rows:
        system = [{"role": "system", "content": system_prompt}] if system_prompt else []
        messages = system + shots + [ask(row["problem"])]
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, enable_thinking=enable_thinking
        )
        if not enable_thinking and text.endswith("<think>\n"):
            text += "\n</think>\n\n"
        texts.append(text)
    # The template's text already holds any BOS it wants; add_special_tokens would add a second one.
    all_ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    examples = [
        Example(
            prompt_ids=list(ids),
            answer=row["answer"],
            problem=row["problem"],
            index=row["index"],
            row=row.get("source", row),
        )
        for row, ids in zip(rows, all_ids, strict=True)
        if len(ids) <= max_prompt_len
    ]
    if n_long := len(rows) - len(examples):
        log.warning(f"dropped {n_long} of {len(rows)} prompts longer than --max-prompt-len {max_prompt_len} tokens")
    if not examples:
        raise UsageError(f"no prompts left (of {len(rows)}) with at most --max-prompt-len {max_prompt_len} tokens")
    return examples


def load_examples(
    source: str,
    tokenizer,
    *,
    split: str = "train",
    prompt_field: str | None = None,
    answer_field: str | None = None,
    system_prompt: str | None = None,
    instruction: str = DEFAULT_INSTRUCTION,
    few_shot: tuple[str, ...] = (),
    enable_thinking: bool = True,
    max_prompt_len: int = 1024,
    max_samples: int | None = None,
    seed: int = 0,
    skip_bad_rows: bool = False,
) -> list[Example]:
    """`load_rows` then `build_examples`; `max_samples` keeps a seeded random subset (in source order) before the
    length filter, so the result can be a little smaller than max_samples."""
    rows = load_rows(
        source, split=split, prompt_field=prompt_field, answer_field=answer_field, skip_bad_rows=skip_bad_rows
    )
    if max_samples is not None:
        if max_samples <= 0:
            raise UsageError(f"--max-samples {max_samples}: must be ≥ 1")
        if max_samples < len(rows):
            keep = th.randperm(len(rows), generator=th.Generator().manual_seed(seed))[:max_samples]
            rows = [rows[i] for i in sorted(keep.tolist())]
    return build_examples(
        rows,
        tokenizer,
        system_prompt=system_prompt,
        instruction=instruction,
        few_shot=few_shot,
        enable_thinking=enable_thinking,
        max_prompt_len=max_prompt_len,
    )


def prompt_batch(
    examples: list[Example],
    step: int,
    prompts_per_step: int,
    *,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    round_: int = 0,
) -> list[Example]:
    """This rank's prompts for `step`: global batch `step` of a per-epoch seeded shuffle, split as batch[rank::world_size].

    Each epoch is a fresh permutation seeded by (seed, epoch); the last partial batch of an epoch is dropped. Ranks get
    disjoint prompts that together make the global batch, and the step alone fixes the position (resume = same step).
    round_ k > 0 (dynamic sampling's further batches) reads the same position in a shuffle of its own, seeded by
    (seed, epoch, k).
    """
    if prompts_per_step <= 0 or step < 0:
        raise ValueError(f"need prompts_per_step > 0 and step >= 0, got {prompts_per_step} and {step}")
    if not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if prompts_per_step % world_size:
        raise ValueError(f"prompts_per_step={prompts_per_step} is not divisible by world_size={world_size}")
    batches_per_epoch = len(examples) // prompts_per_step
    if batches_per_epoch == 0:
        raise UsageError(f"--prompts-per-step {prompts_per_step}: more than the {len(examples)} usable problems")
    epoch, i = divmod(step, batches_per_epoch)
    perm_seed = seed * 1_000_003 + epoch + round_ * 2**40  # rounds never share a shuffle with any epoch
    perm = th.randperm(len(examples), generator=th.Generator().manual_seed(perm_seed))  # (N,)
    batch = perm[i * prompts_per_step : (i + 1) * prompts_per_step].tolist()
    return [examples[j] for j in batch[rank::world_size]]
