"""One GRPO step of TRL's GRPOTrainer vs one step of this trainer, on CPU, offline (bench.py's `step_speedup_vs_trl`;
needs the optional extra `bench`).

    step_speedup_vs_trl = median TRL step wall time / median grpo step wall time

Same saved model directory (fp32 weights loaded twice, one copy each), the same chat-templated prompts tokenized the
same way, G completions per prompt, exactly `max_new_tokens` tokens per completion (EOS disabled in both), T = 1,
top-k/top-p off, beta = 0 (no reference model), one rollout per optimizer step (num_iterations = 1, no gradient
accumulation: TRL then skips the old-log-prob pass, as grpo.update does), one AdamW step, a constant reward.

One step of ours = rollout.rollout (the engine, with per-row noise streams, as train()) + decode + reward + group_advantages +
grpo.update, i.e. train()'s loop body without metrics/checkpoints. One step of TRL = the Trainer's inner loop between
on_step_begin and on_step_end: training_step (_prepare_inputs → generate + decode + reward + advantages; compute_loss;
backward) + grad clipping + optimizer/scheduler step. The two run interleaved, step by step, so that load on a shared
CPU hits both alike.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch as th

import checkpoints
import grpo
import policy
import rollout
from bench_common import QWEN3_ROWS, QWEN3_TOKENIZER, random_qwen3


def save_random_qwen3(model_dir: str | Path, hidden: int = 128, layers: int = 2) -> Path:
    """A random Qwen3-shaped model (vocab 151,936, bench_common.random_qwen3) + the real Qwen3 tokenizer, saved to
    model_dir."""
    from transformers import AutoTokenizer

    model_dir = Path(model_dir)
    tok = AutoTokenizer.from_pretrained(str(QWEN3_TOKENIZER))
    model = random_qwen3(QWEN3_ROWS, hidden=hidden, layers=layers)
    model.generation_config.eos_token_id = tok.convert_tokens_to_ids("<|im_end|>")  # as Qwen3 ships it
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    return model_dir


def chat_prompts(tokenizer, problems: list[str]) -> list[str]:
    """Problems → chat-templated prompt texts, as data.build_examples renders them (thinking template)."""
    import data

    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": f"{p}\n\n{data.DEFAULT_INSTRUCTION}"}],
            tokenize=False,
            add_generation_prompt=True,
            enable_thinking=True,
        )
        for p in problems
    ]


def constant_reward(completions, **kwargs) -> list[float]:
    return [1.0] * len(completions)


def _timed(store: dict, key: str, fn):
    """fn wrapped so that each call's wall time is appended to store[key]."""

    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        store.setdefault(key, []).append(time.perf_counter() - t0)
        return out

    return wrapper


def trl_steps(model_dir: str, prompts: list[str], group_size: int, max_new_tokens: int, steps: int, lr: float,
              seed: int = 0, gradient_checkpointing: bool = False, between_steps=None) -> dict:  # fmt: skip
    """Run TRL's GRPOTrainer for `steps` optimizer steps; per-step wall times and a breakdown per step.

    between_steps(i), if given, runs after TRL's step i ends (outside its timed window): the other trainer's step,
    interleaved so that load drift on a shared CPU hits both alike."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.begin, self.seconds, self.cpu_seconds = None, [], []

        def on_step_begin(self, args, state, control, **kwargs):
            self.begin = (time.perf_counter(), time.process_time())

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds.append(time.perf_counter() - self.begin[0])
            self.cpu_seconds.append(time.process_time() - self.begin[1])
            if between_steps is not None:
                between_steps(len(self.seconds) - 1)

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=th.float32)
    B = len(prompts) * group_size
    out_dir = tempfile.mkdtemp(prefix="trl_grpo_bench_")
    args = GRPOConfig(
        output_dir=out_dir,
        use_cpu=True,
        bf16=False,
        fp16=False,
        # TRL's configs default to gradient checkpointing ON (recomputes the decoder in backward); grpo.Config
        # defaults to off, so the like-for-like comparison turns it off.
        gradient_checkpointing=gradient_checkpointing,
        seed=seed,
        # per_device_train_batch_size counts completions, not prompts: B = prompts × G completions of
        # len(prompts) distinct prompts per step, all in one generate call and one loss forward/backward.
        per_device_train_batch_size=B,
        num_generations=group_size,
        steps_per_generation=1,
        gradient_accumulation_steps=1,
        num_iterations=1,
        max_steps=steps,
        max_completion_length=max_new_tokens,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        # EOS off: generate never stops early (eos_token_id=None). TRL still masks after the first id in
        # trainer.eos_token_ids (tokenizer's + model's EOS) post hoc; the completion-length metrics check that none
        # was sampled (p ≈ 2 / 151,936 per token for a random model).
        generation_kwargs={"eos_token_id": None},
        beta=0.0,
        loss_type="dapo",  # = grpo Config.loss_type "token"
        epsilon=0.2,
        epsilon_high=0.28,
        scale_rewards="group",
        learning_rate=lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        shuffle_dataset=False,  # keep the prompts in the given order (each step's batch is all of them anyway)
        logging_steps=1,  # one log_history entry per step: its completion-length metrics are checked below
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        disable_tqdm=True,
        log_completions=False,
        dataloader_num_workers=0,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=constant_reward,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": list(prompts)}),
        processing_class=tokenizer,
    )
    timer = StepTimer()
    trainer.add_callback(timer)
    parts: dict[str, list[float]] = {}
    seen = {"prompt_ids": [], "completion_lens": []}
    gen_single = trainer._generate_single_turn

    def generate_single_turn(prompt_ids, *a, **kw):
        seen["prompt_ids"].append([list(p) for p in prompt_ids])
        completion_ids, logprobs = gen_single(prompt_ids, *a, **kw)
        seen["completion_lens"].append([len(c) for c in completion_ids])
        return completion_ids, logprobs

    # Breakdown: generate (model.generate + EOS masking), rollout = generate + decode + reward + advantages, loss =
    # compute_loss (forward + loss), the rest of the step is backward + clipping + AdamW.
    trainer._generate_single_turn = _timed(parts, "generate", generate_single_turn)
    trainer._generate_and_score_completions = _timed(parts, "rollout", trainer._generate_and_score_completions)
    trainer.compute_loss = _timed(parts, "loss_forward", trainer.compute_loss)
    trainer.training_step = _timed(parts, "training_step", trainer.training_step)
    try:
        trainer.train()
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)  # save_strategy "no": only an empty output directory

    logs = [h for h in trainer.state.log_history if "completions/mean_length" in h]
    if trainer.state.global_step != steps or len(timer.seconds) != steps or len(logs) != steps:
        raise RuntimeError(f"TRL ran {trainer.state.global_step} steps, timed {len(timer.seconds)}, logged {len(logs)}")
    for key in ("generate", "rollout", "loss_forward", "training_step"):
        if len(parts.get(key, [])) != steps:
            raise RuntimeError(f"TRL called {key} {len(parts.get(key, []))} times in {steps} steps")
    for i, h in enumerate(logs):
        if h["completions/min_length"] != max_new_tokens or h["completions/max_length"] != max_new_tokens:
            raise RuntimeError(f"TRL step {i + 1}: completion lengths {h['completions/min_length']}–"
                               f"{h['completions/max_length']}, wanted {max_new_tokens}")  # fmt: skip
    for lens in seen["completion_lens"]:
        if len(lens) != B or set(lens) != {max_new_tokens}:
            raise RuntimeError(f"TRL generated {len(lens)} completions of lengths {sorted(set(lens))}")
    return {
        "step_s": timer.seconds,
        "step_cpu_s": timer.cpu_seconds,
        "generate_s": parts["generate"],
        "rollout_s": parts["rollout"],
        "loss_forward_s": parts["loss_forward"],
        "training_step_s": parts["training_step"],
        "prompt_ids": seen["prompt_ids"],
        "logs": logs,
        "step_time_metric": [h.get("step_time") for h in logs],
    }


def ours_stepper(model_dir: str, prompts: list[str], group_size: int, max_new_tokens: int, lr: float,
                 seed: int = 0):  # fmt: skip
    """train()'s loop body (rollout, reward, advantages, one update) as step(i), recording per-phase wall times."""
    device = th.device("cpu")
    th.manual_seed(seed)
    model, tokenizer = checkpoints.load_model_and_tokenizer(model_dir, device)
    cfg = grpo.Config(
        model=model_dir,
        prompts_per_step=len(prompts),
        group_size=group_size,
        temperature=1.0,
        top_p=1.0,
        max_new_tokens=max_new_tokens,
        rollout_batch_size=0,  # all B sequences in one sample() call, as TRL's one generate call
        micro_batch_tokens=2**31 - 1,  # every sequence in one packed forward/backward, as TRL's one padded one
        beta=0.0,
        num_iterations=1,
        loss_type="token",
        lr=lr,
        warmup_steps=0,
        device="cpu",
        bf16=False,
        seed=seed,
    )
    rows = model.get_input_embeddings().weight.shape[0]
    adjust = policy.LogitAdjust(cfg.temperature, policy.padding_bias(rows, len(tokenizer), rows), None)
    optimizer = th.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]  # as data.build_examples
    batch = [list(p) for p in ids for _ in range(group_size)]
    record = {"step_s": [], "step_cpu_s": [], "rollout_s": [], "sample_s": [], "update_s": [], "lengths": [],
              "prompt_ids": ids}  # fmt: skip

    def step(i: int) -> None:
        t0, c0 = time.perf_counter(), time.process_time()
        seeds = [rollout.sample_seed(cfg.seed, i, k, j) for k in range(len(prompts)) for j in range(group_size)]
        r = rollout.rollout(
            model,
            tokenizer,
            batch,
            seeds,
            adjust,
            max_new_tokens=cfg.max_new_tokens,
            eos_ids=[-1],
            slots=len(batch),
        )  # EOS off; fmt: skip
        t_sample = time.perf_counter() - t0
        rewards = th.tensor(constant_reward(r.texts), dtype=th.float32)
        advantages = grpo.group_advantages(rewards, cfg.group_size, cfg.adv_scale)
        t_rollout = time.perf_counter() - t0
        t1 = time.perf_counter()
        model.train()
        grpo.update(model, optimizer, r, advantages, adjust, loss_mask=r.completion_mask, old_logp=None,
                    ref_logp=None, **grpo.update_options(cfg))  # fmt: skip
        t_end = time.perf_counter()
        record["step_s"].append(t_end - t0)
        record["step_cpu_s"].append(time.process_time() - c0)
        record["sample_s"].append(t_sample)
        record["rollout_s"].append(t_rollout)
        record["update_s"].append(t_end - t1)
        lengths = r.completion_mask.sum(-1).tolist()
        if len(lengths) != len(batch) or set(lengths) != {max_new_tokens}:
            raise RuntimeError(f"rollout.rollout made {len(lengths)} completions of lengths {sorted(set(lengths))}")
        record["lengths"].append(lengths)

    return step, record


def bench_step_vs_trl(model_dir: str, prompts: list[str], group_size: int = 4, max_new_tokens: int = 64,
                      measured_steps: int = 3, warmup_steps: int = 1, lr: float = 1e-6,
                      trl_gradient_checkpointing: bool = False) -> dict:  # fmt: skip
    """Median wall time of one GRPO step, TRL's GRPOTrainer vs grpo.py, after `warmup_steps` unmeasured steps.

    prompts: chat-templated texts (tokenized without added special tokens, as data.build_examples; TRL tokenizes
    plain-text prompts with tokenizer(text=...), checked to give the same ids)."""
    steps = warmup_steps + measured_steps
    ours_step, ours = ours_stepper(model_dir, prompts, group_size, max_new_tokens, lr)
    # Interleaved: our step i runs right after TRL's step i (outside its timed window).
    trl = trl_steps(model_dir, prompts, group_size, max_new_tokens, steps, lr,
                    gradient_checkpointing=trl_gradient_checkpointing, between_steps=ours_step)  # fmt: skip
    if len(ours["step_s"]) != steps:
        raise RuntimeError(f"ran {len(ours['step_s'])} of our steps, wanted {steps}")
    trl_prompt_ids = trl["prompt_ids"][0]  # (B,) lists: each prompt repeated G times by TRL's RepeatSampler
    if trl_prompt_ids != [p for p in ours["prompt_ids"] for _ in range(group_size)]:
        raise RuntimeError("TRL and grpo tokenized the prompts differently")

    def med(xs):
        return statistics.median(xs[warmup_steps:])

    # TRL step = training_step (rollout + loss forward + backward) + clip + optimizer: split it as ours is split.
    trl_backward_opt = [
        s - r - f for s, r, f in zip(trl["step_s"], trl["rollout_s"], trl["loss_forward_s"], strict=True)
    ]
    trl_step, ours_step = med(trl["step_s"]), med(ours["step_s"])
    B = len(prompts) * group_size
    return {
        "trl_step_s": trl_step,
        "ours_step_s": ours_step,
        "step_speedup_vs_trl": trl_step / ours_step,
        # CPU time of the process over the same windows (all threads): less sensitive to other jobs on a shared CPU
        "step_speedup_vs_trl_cpu_time": med(trl["step_cpu_s"]) / med(ours["step_cpu_s"]),
        "setting": (
            f"{len(prompts)} prompts × G = {group_size} = {B} completions of exactly {max_new_tokens} tokens (EOS off), "
            f"prompt lengths {sorted({len(p) for p in ours['prompt_ids']})}, T = 1, beta = 0, one AdamW step, "
            f"median of {measured_steps} steps after {warmup_steps} warm-up (interleaved), {th.get_num_threads()} torch "
            f"threads, TRL gradient checkpointing {'on' if trl_gradient_checkpointing else 'off'}"
        ),
        "trl": {
            "generate_s": med(trl["generate_s"]),
            "rollout_s": med(trl["rollout_s"]),  # generate + decode + reward + advantages
            "update_s": med([s - r for s, r in zip(trl["step_s"], trl["rollout_s"], strict=True)]),
            "loss_forward_s": med(trl["loss_forward_s"]),
            "backward_opt_s": med(trl_backward_opt),
            "step_time_metric_s": med(trl["step_time_metric"]),  # TRL's own logged step_time (training_step only)
            "completion_len_logged": [h["completions/mean_length"] for h in trl["logs"]],
        },
        "ours": {
            "sample_s": med(ours["sample_s"]),
            "rollout_s": med(ours["rollout_s"]),  # sample + decode + reward + advantages
            "update_s": med(ours["update_s"]),
        },
        "all_steps_s": {"trl": trl["step_s"], "ours": ours["step_s"]},
        "all_steps_cpu_s": {"trl": trl["step_cpu_s"], "ours": ours["step_cpu_s"]},
    }


def run(
    hidden: int = 128, layers: int = 2, group_size: int = 4, max_new_tokens: int = 64, measured_steps: int = 2
) -> dict:
    """The comparison on a random Qwen3-shaped model (V = 151,936) with 4 chat prompts (bench.py's setting)."""
    from transformers import AutoTokenizer

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="step_vs_trl_") as tmp:
        model_dir = str(save_random_qwen3(tmp, hidden=hidden, layers=layers))
        tok = AutoTokenizer.from_pretrained(model_dir)
        problems = ["What is 12 + 7?", "What is 45 + 38?", "Compute 1/2 + 1/3.", "A train travels 60 miles in 1.5 "
                    "hours. How fast is it going?"]  # fmt: skip
        result = bench_step_vs_trl(
            model_dir, chat_prompts(tok, problems), group_size, max_new_tokens, measured_steps=measured_steps
        )
    result["model"] = f"random Qwen3, V = 151,936, hidden {hidden}, {layers} layers"
    result["total_s"] = time.perf_counter() - t0
    return result
