"""Evaluation: the pass@k estimator, the command line's files and their consistency, sampling that does not depend on
batching or ranks, the reasoning share of an expanded checkpoint, and periodic evaluation inside a training run."""

import json
import math
import multiprocessing
from pathlib import Path

import pytest
import torch as th
import torch.distributed as dist

import checkpoints
import evaluate
import grpo
import policy
import reward
import scoring
import vocab as rvocab
from evaluate import pass_at_k
from tests.test_grpo import run_cfg


def even_length(completions, answers, format_weight=0.0):
    """A toy verifier a random tiny model passes about half the time (so pass@1 and pass@k differ)."""
    hits = [float(len(c) % 2 == 0) for c in completions]
    return hits, hits


def write_problems(path: Path, n: int = 5) -> Path:
    rows = [{"problem": f"What is {i} + {i + 2}?", "answer": str(2 * i + 2)} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def cli(model_dir, dataset, out, *extra) -> list[str]:
    return ["--model", str(model_dir), "--datasets", str(dataset), "--samples", "4", "--max-new-tokens", "8",
            "--temperature", "1.0", "--output-dir", str(out), "--device", "cpu", *extra]  # fmt: skip


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(s) for s in path.read_text().splitlines()]


# ---------------------------------------------------------------------------------------------------------------------
# pass@k


def test_pass_at_k_hand_computed():
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 − C(3,2)/C(5,2) = 0.7
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252)  # 1 − C(7,5)/C(10,5)
    assert pass_at_k(5, 0, 3) == 0.0  # nothing correct
    assert pass_at_k(5, 4, 2) == 1.0  # n − c = 1 < k: every pair holds a correct sample
    assert pass_at_k(4, 4, 4) == 1.0
    assert pass_at_k(8, 3, 1) == pytest.approx(3 / 8)  # pass@1 is the fraction correct
    for n in range(1, 13):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-12)


@pytest.mark.parametrize("n, c, k, match", [(4, 2, 5, "k ≤ n"), (4, 2, 0, "k ≤ n"), (4, 5, 1, "c ≤ n"),
                                            (4, -1, 1, "c ≤ n"), (0, 0, 1, "n ≥ 1"), (4, 2.0, 1, "integers")])  # fmt: skip
def test_pass_at_k_rejects_bad_counts(n, c, k, match):
    with pytest.raises(ValueError, match=match):
        pass_at_k(n, c, k)


def test_pass_ks():
    assert evaluate.pass_ks(1) == [1]
    assert evaluate.pass_ks(4) == [1, 2, 4]
    assert evaluate.pass_ks(6) == [1, 2, 4, 6]


# ---------------------------------------------------------------------------------------------------------------------
# The command line end to end


def test_cli_writes_consistent_records_and_summary(tmp_path, tiny_model_dir, monkeypatch, capsys):
    monkeypatch.setattr(reward, "accuracy_reward", lambda completion, answer: float(len(completion) % 2 == 0))
    data_file = write_problems(tmp_path / "probs.jsonl", n=5)
    out = tmp_path / "eval"
    summaries = evaluate.main(cli(tiny_model_dir, data_file, out))

    records = read_jsonl(out / "probs.jsonl")
    summary = json.loads((out / "summary.json").read_text())[str(data_file)]
    assert summary == pytest.approx(summaries[str(data_file)])
    assert json.loads((out / "eval_config.json").read_text())["samples"] == 4
    assert len(records) == summary["num_problems"] == 5 and summary["samples"] == 4
    assert [r["index"] for r in records] == list(range(5))
    assert [r["gold"] for r in records] == [str(2 * i + 2) for i in range(5)]
    assert records[0]["problem"] == "What is 0 + 2?"
    for r in records:
        for key in ("completions", "answers", "correct", "lengths", "truncated"):
            assert len(r[key]) == 4, key
        assert r["opens_think"]  # the tiny chat template opens a think block
        for text, answer, correct, n, cut in zip(r["completions"], r["answers"], r["correct"], r["lengths"],
                                                 r["truncated"], strict=True):  # fmt: skip
            assert correct == (len("<think>" + text) % 2 == 0)  # scored as the reward sees it
            assert answer == reward.extract_boxed(reward.answer_part("<think>" + text))
            assert 1 <= n <= 8 and (n == 8 or not cut)
        assert "think_tokens" not in r  # no reasoning vocabulary

    flags = [c for r in records for c in r["correct"]]
    per_problem = [sum(r["correct"]) for r in records]
    assert 0 < sum(flags) < len(flags)  # the check below means something
    assert summary["pass@1"] == pytest.approx(sum(flags) / len(flags))
    assert summary["pass@2"] == pytest.approx(sum(1 - math.comb(4 - c, 2) / 6 for c in per_problem) / 5)
    assert summary["pass@4"] == pytest.approx(sum(c > 0 for c in per_problem) / 5)
    lengths = [n for r in records for n in r["lengths"]]
    assert summary["mean_length"] == pytest.approx(sum(lengths) / len(lengths))
    assert summary["truncation_rate"] == pytest.approx(sum(t for r in records for t in r["truncated"]) / len(lengths))
    assert summary["reasoning_share"] is None
    table = capsys.readouterr().out
    assert "| pass@1 |" in table and str(data_file) in table


def test_greedy_repeats_one_completion(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setattr(reward, "accuracy_reward", lambda completion, answer: float(len(completion) % 2 == 0))
    data_file = write_problems(tmp_path / "probs.jsonl", n=3)
    summary = evaluate.main(cli(tiny_model_dir, data_file, tmp_path / "eval", "--greedy"))[str(data_file)]
    records = read_jsonl(tmp_path / "eval" / "probs.jsonl")
    assert all(len(set(r["completions"])) == 1 for r in records)
    assert summary["pass@4"] == pytest.approx(summary["pass@1"])  # k identical samples are one sample
    evaluate.main(cli(tiny_model_dir, data_file, tmp_path / "seed1", "--greedy", "--seed", "1"))
    assert read_jsonl(tmp_path / "seed1" / "probs.jsonl") == records  # no noise: the seed changes nothing


@pytest.mark.parametrize("knob", [["--top-k", "1"], ["--top-p", "1e-6"], ["--min-p", "0.999"]])
def test_sampling_knobs_that_keep_only_the_likeliest_token_decode_greedily(tmp_path, tiny_model_dir, knob):
    """evaluate.py samples from the truncated distribution its options set: kept sets of one token (the argmax: top-k 1,
    a top-p mass below the first token's, a min-p ratio no second token reaches) give the greedy completions."""
    data_file = write_problems(tmp_path / "probs.jsonl", n=3)
    evaluate.main(cli(tiny_model_dir, data_file, tmp_path / "greedy", "--greedy"))
    evaluate.main(cli(tiny_model_dir, data_file, tmp_path / "knob", *knob))
    greedy, sampled = (read_jsonl(tmp_path / run / "probs.jsonl") for run in ("greedy", "knob"))
    assert [r["completions"] for r in sampled] == [r["completions"] for r in greedy]
    evaluate.main(cli(tiny_model_dir, data_file, tmp_path / "full"))  # without the knob: samples differ
    assert [r["completions"] for r in read_jsonl(tmp_path / "full" / "probs.jsonl")] != [
        r["completions"] for r in greedy
    ]


def test_results_do_not_depend_on_batch_size_and_training_mode_is_restored(tmp_path, tiny_model_dir):
    model, tokenizer = checkpoints.load_model_and_tokenizer(str(tiny_model_dir), th.device("cpu"))
    adjust = policy.model_adjust(model, tokenizer, None, 1.0)
    examples = evaluate.data.load_examples(str(write_problems(tmp_path / "p.jsonl", n=3)), tokenizer)
    kw = dict(samples=2, max_new_tokens=8, scorer=scoring.scorer(verifier=even_length))
    model.train()
    one, summary_one = evaluate.evaluate(model, tokenizer, examples, adjust, batch_size=1, **kw)
    assert model.training
    model.eval()
    many, summary_many = evaluate.evaluate(model, tokenizer, examples, adjust, batch_size=64, **kw)
    assert not model.training
    assert one == many and summary_one == summary_many
    assert len({c for r in one for c in r["completions"]}) > 2  # sampled, not one repeated text
    other, _ = evaluate.evaluate(model, tokenizer, examples, adjust, batch_size=4, seed=1, **kw)
    assert other != one  # the seed matters
    with pytest.raises(ValueError, match="samples"):
        evaluate.evaluate(model, tokenizer, examples, adjust, samples=0, max_new_tokens=4)


def test_checkpoint_with_reasoning_vocab_reports_its_share(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setattr(reward, "accuracy_reward", lambda completion, answer: float(len(completion) % 2 == 0))
    model, tokenizer = checkpoints.load_model_and_tokenizer(str(tiny_model_dir), th.device("cpu"))
    vocab = rvocab.add_reasoning_vocab(model, tokenizer, rvocab.ALL_REGULAR)
    ckpt = tmp_path / "ckpt"  # as checkpoints.save_checkpoint writes it
    model.save_pretrained(ckpt)
    tokenizer.save_pretrained(ckpt)
    rvocab.save_map(vocab, ckpt)
    data_file = write_problems(tmp_path / "probs.jsonl", n=4)
    summary = evaluate.main(cli(ckpt, data_file, tmp_path / "eval"))[str(data_file)]
    records = read_jsonl(tmp_path / "eval" / "probs.jsonl")
    think = sum(n for r in records for n in r["think_tokens"])
    used = sum(n for r in records for n in r["reasoning_tokens"])
    for r in records:
        for n, t, u in zip(r["lengths"], r["think_tokens"], r["reasoning_tokens"], strict=True):
            assert 0 <= u <= t <= n
    assert summary["reasoning_share"] == pytest.approx(used / think)
    # Every regular token copied and the offset on: inside think each token is its copy half of the time.
    assert 0 < summary["reasoning_share"] < 1
    assert all("⟦" not in c for r in records for c in r["completions"])  # mapped text, not the marked viewer form


def _evaluate_as_rank(rank: int, store: Path, inputs: tuple, result: Path) -> None:
    th.set_num_threads(1)  # a forked child must not use the parent's OpenMP thread pool
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    scored = []

    def counting(completions, answers):
        scored.append(len(completions))
        return even_length(completions, answers)

    model, tokenizer, examples, adjust = inputs
    records, summary = evaluate.evaluate(model, tokenizer, examples, adjust, samples=3, max_new_tokens=8, batch_size=2,
                                         scorer=scoring.scorer(verifier=counting))  # fmt: skip
    result.write_text(json.dumps({"records": records, "summary": summary, "scored": sum(scored)}))
    dist.destroy_process_group()


def test_two_ranks_evaluate_like_one_process(tmp_path, tiny_model_dir):
    """Two gloo ranks (forked: no second start-up) each sample their share of the problems; every rank ends with the
    one-process results."""
    model, tokenizer = checkpoints.load_model_and_tokenizer(str(tiny_model_dir), th.device("cpu"))
    adjust = policy.model_adjust(model, tokenizer, None, 1.0)
    examples = evaluate.data.load_examples(str(write_problems(tmp_path / "p.jsonl", n=5)), tokenizer)
    inputs = (model, tokenizer, examples, adjust)
    threads = th.get_num_threads()
    th.set_num_threads(1)  # as in the ranks, so that the float arithmetic is the same
    try:
        one = evaluate.evaluate(
            model, tokenizer, examples, adjust, samples=3, max_new_tokens=8, scorer=scoring.scorer(verifier=even_length)
        )
    finally:
        th.set_num_threads(threads)
    fork = multiprocessing.get_context("fork")
    results = [tmp_path / f"rank{r}.json" for r in range(2)]
    procs = [fork.Process(target=_evaluate_as_rank, args=(r, tmp_path / "store", inputs, results[r])) for r in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
    assert [proc.exitcode for proc in procs] == [0, 0]
    ranks = [json.loads(f.read_text()) for f in results]
    assert [r["scored"] for r in ranks] == [3 * 3, 2 * 3]  # examples[rank::2]: 3 and 2 of the 5 problems
    for r in ranks:
        assert r["records"] == one[0] and r["summary"] == pytest.approx(one[1])


# ---------------------------------------------------------------------------------------------------------------------
# Periodic evaluation during training


def test_training_evaluates_at_start_every_n_steps_and_at_the_end(tmp_path, tiny_model_dir):
    data_file = write_problems(tmp_path / "probs.jsonl", n=3)
    out = tmp_path / "run"
    cfg = dict(dataset=str(data_file), prompts_per_step=1, steps=2, save_every=2, eval_every=2,
               eval_dataset=str(data_file), eval_samples=2, eval_max_new_tokens=4)  # fmt: skip
    grpo.train(run_cfg(tiny_model_dir, out, **cfg), score_fn=even_length)
    lines = read_jsonl(out / "metrics.jsonl")
    assert [m["step"] for m in lines] == [0, 1, 2]
    assert "reward" not in lines[0] and "eval_accuracy" in lines[0]  # the starting point, before any update
    assert "eval_accuracy" not in lines[1] and "reward" in lines[1]
    assert "eval_accuracy" in lines[2] and "reward" in lines[2]
    for m in (lines[0], lines[2]):
        assert {"eval_pass@2", "eval_len", "eval_truncated", "eval_s"} <= m.keys()
        assert "eval_reasoning_share" not in m  # a baseline run
    for step, m in ((0, lines[0]), (2, lines[2])):
        records = read_jsonl(out / "eval" / f"step_{step:06d}.jsonl")
        assert len(records) == 3 and all(len(r["completions"]) == 2 for r in records)
        flags = [c for r in records for c in r["correct"]]
        assert m["eval_accuracy"] == pytest.approx(sum(flags) / len(flags))
        lengths = [n for r in records for n in r["lengths"]]
        assert m["eval_len"] == pytest.approx(sum(lengths) / len(lengths)) and max(lengths) <= 4

    # Resuming at step 2 does not evaluate step 0 again; the final step (3) is evaluated.
    grpo.train(run_cfg(tiny_model_dir, out, **{**cfg, "steps": 3}), score_fn=even_length)
    lines = read_jsonl(out / "metrics.jsonl")
    assert [m["step"] for m in lines] == [0, 1, 2, 3]
    assert "eval_accuracy" in lines[3]
    assert sorted(p.name for p in (out / "eval").iterdir()) == [f"step_00000{s}.jsonl" for s in (0, 2, 3)]


def test_eval_every_needs_a_dataset(tmp_path, tiny_model_dir):
    with pytest.raises(ValueError, match="--eval-every 1: must be 0 without --eval-dataset"):
        grpo.train(run_cfg(tiny_model_dir, tmp_path / "run", eval_every=1))
