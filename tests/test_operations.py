"""Operating the trainer: options checked before anything loads (naming the flag as typed), evaluation that uses the
run's own settings, resume that survives a damaged checkpoint and keeps every log consistent, data files that fail
with their line number, checkpoint states that cannot run code, GPUs that are never silently dropped, and wandb."""

import dataclasses
import glob
import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch as th

import checkpoints
import cli
import config
import distributed
import evaluate
import grpo
from config import Config, UsageError, check_config
from data import load_rows
from tests.test_grpo import letter_e, run_cfg

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------------------------
# Options: checked before anything loads or is written, one line naming the flag


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--temperature", "0"], "--temperature 0.0: must be > 0"),
        (["--max-new-tokens", "0"], "--max-new-tokens 0: must be ≥ 1"),
        (["--group-size", "1"], "--group-size 1: must be ≥ 2"),
        (["--lr", "-1"], "--lr -1.0: must be ≥ 0"),
        (["--top-p", "1.5"], "--top-p 1.5: must be in (0, 1]"),
        (["--eps-low", "1"], "--eps-low 1.0: must be in [0, 1)"),
        (["--micro-batch-size", "0"], "--micro-batch-size 0: must be ≥ 1"),
        (["--reasoning-vocab-size", "-2"], "--reasoning-vocab-size -2: must be ≥ 0, or -1"),
        (["--eval-every", "5"], "--eval-every 5: must be 0 without --eval-dataset"),
        (
            ["--few-shot", "What is 1 + 1?"],
            "--few-shot What is 1 + 1?: must be an even number of texts (PROBLEM RESPONSE pairs), got 1",
        ),
        (["--max-grad-norm", "nan"], "--max-grad-norm nan: must be"),
        (["--device", "gpu"], "--device gpu: must be auto, cpu, cuda or cuda:N"),
        (["--model", "/no/such/model"], "--model /no/such/model: no such directory or file"),
        (["--model", "missing.gguf"], "--model missing.gguf: no such file"),
        (["--dataset", "/no/such/data.jsonl"], "--dataset /no/such/data.jsonl: no such file"),
        (["--resume", "/no/such/checkpoint"], "--resume /no/such/checkpoint: no such checkpoint directory"),
    ],
)
def test_bad_option_is_one_line_naming_the_flag(flags, message, tiny_model_dir, tmp_path, capsys):
    base = ["--model", str(tiny_model_dir), "--dataset", "arithmetic", "--output-dir", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_:  # a flag given twice: the last one counts
        cli.cli_config([*base, *flags])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1, err


def test_prompts_per_step_must_divide_over_the_ranks(tiny_model_dir, monkeypatch):
    cfg = Config(model=str(tiny_model_dir), dataset="arithmetic", prompts_per_step=6)
    check_config(cfg, world_size=3)
    with pytest.raises(UsageError, match="--prompts-per-step 6: must be divisible by the 4 ranks"):
        check_config(cfg, world_size=4)
    monkeypatch.setenv("WORLD_SIZE", "4")  # what torchrun sets: the default
    with pytest.raises(UsageError, match="divisible by the 4 ranks"):
        check_config(cfg)


def test_a_run_directory_is_not_a_model(tmp_path, tiny_model_dir):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(dataclasses.asdict(Config())))  # the trainer's config, no model_type
    with pytest.raises(UsageError, match="not a transformers model directory .*checkpoints/step_N"):
        config.check_model_source("model", str(run))
    config.check_model_source("model", str(tiny_model_dir))


def test_resuming_does_not_need_the_base_model(tmp_path, tiny_model_dir):
    cfg = Config(model=str(tmp_path / "moved-away"), dataset="arithmetic", output_dir=str(tmp_path / "run"))
    with pytest.raises(UsageError, match="--model"):
        check_config(cfg)
    (tmp_path / "run" / "checkpoints" / "step_000004").mkdir(parents=True)
    check_config(cfg)  # --resume auto will load the checkpoint


def test_hub_id_missing_from_the_offline_cache_says_so(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UsageError, match=r"--model nobody/no-such-model-xyz: .*offline \(HF_HUB_OFFLINE\)"):
        config.check_model_source("model", "nobody/no-such-model-xyz")


def test_train_refuses_before_writing_or_loading(tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    with pytest.raises(UsageError, match="--temperature"):
        grpo.train(run_cfg(tiny_model_dir, out, temperature=0.0))
    assert not out.exists()


@pytest.mark.parametrize("script", ["grpo.py", "evaluate.py"])
def test_help_and_option_errors_do_not_import_torch(script, tmp_path):
    """`--help` and a bad option answer before the heavy imports (torch ~4 s, sympy ~3 s): -X importtime lists
    every module imported."""
    bad = ["--temperature", "0"] if script == "grpo.py" else ["--model", str(tmp_path / "none"), "--samples", "0"]
    for args in (["--help"], bad):
        out = subprocess.run([sys.executable, "-X", "importtime", script, *args], cwd=ROOT, capture_output=True,
                             text=True, timeout=120)  # fmt: skip
        imported = {line.split("|")[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")}
        assert out.returncode == (0 if args == ["--help"] else 2), out.stderr[-2000:]
        assert "tyro" in imported and not {"torch", "transformers", "sympy", "math_verify"} & imported
        if args == bad:
            errors = [s for s in out.stderr.splitlines() if not s.startswith("import time:")]
            assert len(errors) == 1 and errors[0].startswith("error: --"), errors


# ---------------------------------------------------------------------------------------------------------------------
# evaluate.py on a checkpoint: the run's prompt and sampling options unless given


def test_evaluate_uses_the_checkpoint_trainer_config_unless_given(tmp_path, tiny_model_dir, monkeypatch, capsys):
    trained = Config(model="x", instruction="Answer with a number.", system_prompt="Be brief.", enable_thinking=False,
                     temperature=0.9, top_p=0.95, top_k=7, min_p=0.01, max_new_tokens=48, eval_max_new_tokens=5,
                     max_prompt_len=200, few_shot=("What is 9 + 9?", "\\boxed{18}"),
                     reward=("accuracy", "tests/rewards_for_tests.py:text_length"), reward_weights=(1.0, 0.5))  # fmt: skip
    (tiny_model_dir / "trainer_config.json").write_text(json.dumps(dataclasses.asdict(trained)))
    data = tmp_path / "p.jsonl"
    data.write_text(
        "".join(json.dumps({"problem": f"What is {i} + 1?", "answer": str(i + 1)}) + "\n" for i in range(3))
    )
    monkeypatch.setattr(evaluate, "PROGRESS_EVERY", 1e-9)  # a progress line at every decode step
    shown, build = [], evaluate.data.build_examples  # the worked examples the prompts were built with
    monkeypatch.setattr(
        evaluate.data, "build_examples", lambda *a, **kw: shown.append(kw["few_shot"]) or build(*a, **kw)
    )
    out = tmp_path / "eval"
    evaluate.main(["--model", str(tiny_model_dir), "--datasets", str(data), "--samples", "2", "--top-p", "1.0",
                   "--output-dir", str(out), "--device", "cpu"])  # fmt: skip
    used = json.loads((out / "eval_config.json").read_text())
    assert (used["instruction"], used["system_prompt"], used["enable_thinking"]) == (
        trained.instruction,
        "Be brief.",
        False,
    )
    assert (used["temperature"], used["max_new_tokens"], used["max_prompt_len"]) == (0.9, 5, 200)
    assert used["few_shot"] == list(trained.few_shot) and shown == [trained.few_shot]
    assert used["top_p"] == 1.0  # given on the command line: the flag wins
    assert (used["top_k"], used["min_p"], used["reward_weights"]) == (7, 0.01, [1.0, 0.5])
    summary = json.loads((out / "summary.json").read_text())[str(data)]
    assert summary["reward"] == pytest.approx(summary["reward/accuracy"] + 0.5 * summary["reward/text_length"])
    printed = capsys.readouterr().out
    assert "is a training checkpoint" in printed and "temperature=0.9 (trainer_config.json)" in printed
    assert "top_p=1.0 (given)" in printed
    assert "[rollout] " in printed and "tokens/s" in printed  # the progress line
    records = [json.loads(s) for s in (out / "p.jsonl").read_text().splitlines()]
    assert max(n for rec in records for n in rec["lengths"]) <= 5


def test_evaluate_without_trainer_config_keeps_its_defaults(tiny_model_dir):
    cfg = config.EvalConfig(model=str(tiny_model_dir))
    assert cli.with_training_options(cfg, set()) == cfg


# ---------------------------------------------------------------------------------------------------------------------
# Resume: a damaged checkpoint is skipped (named, kept); a state file cannot run code; the logs agree


def short_run(tiny_model_dir, out, **kw):
    return run_cfg(tiny_model_dir, out, **{"steps": 4, "save_every": 2, "sample_every": 1, "max_new_tokens": 6, **kw})


@pytest.mark.parametrize("damage", ["delete_weights", "truncate_state"])
def test_damaged_latest_checkpoint_falls_back_and_is_kept(tmp_path, tiny_model_dir, damage, capfd):
    out = grpo.train(short_run(tiny_model_dir, tmp_path / "run"), score_fn=letter_e)
    latest = checkpoints.checkpoint_dirs(out)[-1]
    assert latest.name == "step_000004" and checkpoints.checkpoint_problem(latest) is None
    if damage == "delete_weights":
        (latest / "model.safetensors").unlink()
    else:
        state = latest / "trainer_state.pt"
        state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    assert checkpoints.checkpoint_problem(latest) is not None
    capfd.readouterr()
    assert checkpoints.find_resume("auto", out).name == "step_000002"
    assert "step_000004" in capfd.readouterr().err  # the warning names the damaged one
    with pytest.raises(UsageError, match="--resume .*step_000004"):
        checkpoints.find_resume(str(latest), out)

    grpo.train(short_run(tiny_model_dir, out, steps=5), score_fn=letter_e)  # resumes at 2, saves 4 anew, ends at 5
    assert [p.name for p in checkpoints.checkpoint_dirs(out)][-2:] == ["step_000004", "step_000005"]
    assert checkpoints.checkpoint_problem(out / "checkpoints" / "step_000004") is None
    assert len(glob.glob(str(out / "checkpoints" / "damaged_step_000004_*"))) == 1  # moved aside, not deleted
    steps = [json.loads(s)["step"] for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]


def test_rotation_keeps_damaged_checkpoints_and_the_one_just_written(tmp_path, tiny_model_dir):
    """Resumed at 50 past a damaged 100, --keep-last 1: saving 60 keeps 0 and 60 and leaves 100 alone."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    opt = th.optim.AdamW(model.parameters())
    sched = th.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    for step, keep in ((0, 5), (50, 5), (100, 5), (60, 1)):
        if step == 60:
            (tmp_path / "checkpoints" / "step_000100" / "model.safetensors").unlink()
        checkpoints.save_checkpoint(tmp_path, step, model, tok, None, opt, sched, config={}, keep_last=keep,
                                    final_step=1000)  # fmt: skip
    assert [d.name for d in checkpoints.checkpoint_dirs(tmp_path)] == ["step_000000", "step_000060", "step_000100"]
    assert checkpoints.checkpoint_problem(tmp_path / "checkpoints" / "step_000100") == "model.safetensors is missing"


class RunsCode:
    """Pickled as a call to os.mkdir: what a malicious trainer_state.pt could hold."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_state_file_that_would_run_code_is_refused(tmp_path, tiny_model_dir):
    out = grpo.train(short_run(tiny_model_dir, tmp_path / "run", steps=2), score_fn=letter_e)
    latest = checkpoints.checkpoint_dirs(out)[-1]
    marker = tmp_path / "code-ran"
    th.save({"step": 2, "payload": RunsCode(str(marker))}, latest / "trainer_state.pt")
    assert "not plain data" in checkpoints.checkpoint_problem(latest)
    with pytest.raises(UsageError, match="not plain data"):
        checkpoints.find_resume(str(latest), out)
    assert checkpoints.find_resume("auto", out).name == "step_000000"  # the intact one before it
    with pytest.raises(Exception, match="Weights only load failed"):
        checkpoints.restore_trainer_state(latest, None, None, None)
    assert not marker.exists()


def test_logs_agree_with_the_checkpoint_after_a_crash(tmp_path, tiny_model_dir, capfd):
    """A crash after step 4 but before its checkpoint: metrics, samples and eval records of steps 3–4 (and a line cut
    short) are dropped on resume, so every step is logged exactly once."""
    data = tmp_path / "p.jsonl"
    data.write_text(
        "".join(json.dumps({"problem": f"What is {i} + 1?", "answer": str(i + 1)}) + "\n" for i in range(4))
    )
    cfg = short_run(tiny_model_dir, tmp_path / "run", eval_every=1, eval_dataset=str(data), eval_samples=1,
                    eval_max_new_tokens=4)  # fmt: skip
    out = grpo.train(cfg, score_fn=letter_e)
    import shutil

    shutil.rmtree(out / "checkpoints" / "step_000004")  # the crash came before this checkpoint was renamed in
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "rew')  # and cut a line short
    capfd.readouterr()
    grpo.train(cfg, score_fn=letter_e)
    steps = lambda name: [json.loads(s)["step"] for s in (out / name).read_text().splitlines()]  # noqa: E731
    assert steps("metrics.jsonl") == [0, 1, 2, 3, 4]
    assert sorted(set(steps("samples.jsonl"))) == [1, 2, 3, 4]
    assert len(steps("samples.jsonl")) == 4 * len([s for s in steps("samples.jsonl") if s == 1])  # each step once
    assert sorted(p.name for p in (out / "eval").iterdir()) == [f"step_00000{s}.jsonl" for s in range(5)]
    printed = capfd.readouterr()
    assert "resumed from" in printed.out and "rollout " in printed.out and "s + update " in printed.out
    assert "Writing model shards" not in printed.err + printed.out  # no progress bar at each checkpoint


# ---------------------------------------------------------------------------------------------------------------------
# Data files: the file and the line


def test_empty_data_file_says_it_is_empty(tmp_path):
    for name in ("empty.jsonl", "empty.json"):
        (tmp_path / name).write_text("\n")
        with pytest.raises(UsageError, match=rf"{name}: the file is empty"):
            load_rows(str(tmp_path / name))


def test_malformed_line_is_named_and_skippable(tmp_path, caplog):
    path = tmp_path / "d.jsonl"
    good = [json.dumps({"problem": f"p{i}", "answer": str(i)}) for i in range(3)]
    path.write_text("\n".join([good[0], '{"problem": "p", "answer": ', good[1], "[1, 2]", good[2]]) + "\n")
    with pytest.raises(UsageError, match=r"d.jsonl line 2: not valid JSON .*--skip-bad-rows"):
        load_rows(str(path))
    rows = load_rows(str(path), skip_bad_rows=True)
    assert [r["problem"] for r in rows] == ["p0", "p1", "p2"]
    assert "skipped 2 unparseable line(s) (first: line 2" in caplog.text
    array = tmp_path / "a.json"
    array.write_text('[\n{"problem": "p", "answer": "1"},\n{"problem": "q" "answer": "2"}\n]')
    with pytest.raises(UsageError, match=r"a.json line 3: not valid JSON"):
        load_rows(str(array))
    with pytest.raises(UsageError, match=r"d.jsonl: a local file has one split, 'train'"):
        load_rows(str(path), split="test", skip_bad_rows=True)


# ---------------------------------------------------------------------------------------------------------------------
# GPUs: a job given GPUs that torch cannot use stops at once


@pytest.mark.parametrize(
    ("device", "env", "refused"),
    [
        ("auto", {"CUDA_VISIBLE_DEVICES": "0,1"}, True),
        ("auto", {"SLURM_GPUS_ON_NODE": "4"}, True),
        ("cuda", {}, True),
        ("auto", {}, False),
        ("auto", {"SLURM_GPUS_ON_NODE": "0", "CUDA_VISIBLE_DEVICES": ""}, False),
        ("cpu", {"CUDA_VISIBLE_DEVICES": "0"}, False),
    ],
)
def test_gpus_given_but_unusable_stop_the_run(monkeypatch, device, env, refused):
    for var in ("CUDA_VISIBLE_DEVICES", "SLURM_STEP_GPUS", "SLURM_JOB_GPUS", "SLURM_GPUS_ON_NODE"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    monkeypatch.setattr(th.cuda, "is_available", lambda: False)  # as with a driver older than torch's CUDA
    if refused:
        with pytest.raises(
            UsageError, match=re.escape(f"torch {th.__version__} cannot use CUDA (torch built for CUDA")
        ):
            distributed.pick_device(device)
    else:
        assert distributed.pick_device(device) == th.device("cpu")


# ---------------------------------------------------------------------------------------------------------------------
# Weights & Biases, offline, read back


def wandb_records(path: Path):
    """The protobuf records of an offline run's .wandb file (a LevelDB-style log: 32 KiB blocks of chunks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    ident, magic, _ = struct.unpack("<4sHB", data[:7])
    assert (ident, magic) == (b":W&B", 0xBEE1)
    pos, block, chunks = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunks += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last chunk of one
            record = pb.Record()
            record.ParseFromString(chunks)
            chunks = b""
            yield record


def test_wandb_offline_run_lands_in_wandb_dir_and_reads_back(tmp_path, tiny_model_dir, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = grpo.train(short_run(tiny_model_dir, tmp_path / "run", steps=2, wandb="offline"), score_fn=letter_e)
    assert not (out / "wandb").exists()
    (run_file,) = (tmp_path / "wb" / "wandb").glob("offline-run-*/run-*.wandb")
    history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
               for r in wandb_records(run_file) if r.WhichOneof("record_type") == "history"]  # fmt: skip
    logged = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["_step"] for h in history] == [m["step"] for m in logged] == [1, 2]
    for h, m in zip(history, logged, strict=True):
        assert h["reward"] == pytest.approx(m["reward"]) and h["loss"] == pytest.approx(m["loss"])
    assert all(h["samples/_type"] == "table-file" for h in history)  # sample_every=1: a table at each step
    (table,) = run_file.parent.glob("files/media/table/samples_1_*.table.json")
    assert json.loads(table.read_text())["columns"] == ["step", "problem", "answer", "reward", "completion"]
