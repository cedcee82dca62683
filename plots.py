"""Analysis pictures of GRPO runs: PNGs drawn with matplotlib (the optional extra `plot`) and an HTML trace.

    uv run --extra plot python plots.py RUN_DIR [BASELINE_RUN_DIR] [--out DIR]     (default DIR: RUN_DIR/plots)

A run directory is grpo.train's output_dir (config.json, metrics.jsonl, samples.jsonl, checkpoints/). Pictures:
- training.png: reward, accuracy and completion length over steps, with the periodic evaluation's `eval_accuracy`
  (pass@1) and `eval_pass@k` as markers when logged;
- reasoning_share.png: the share of think tokens that are reasoning ids over steps, `eval_reasoning_share` as markers
  (reasoning runs);
- entropy.png: the policy's entropy per completion token over steps; the trainer logs it over text (copies merged
  into their sources, see policy.entropy_of), so a reasoning run and a baseline compare directly;
- drift.png and drift.json: how far each copy moved from its source at the latest checkpoint,
  d_i = ‖W[n_s + i] − W[s_i]‖₂ for reasoning id n_s + i copying standard id s_i, for every weight matrix with one row
  per id (the input embedding; the output layer too when untied): histogram, the copies that moved most, and the
  mean d over steps from the metrics (`embed_drift`, `unembed_drift`);
- usage.png and usage.json: the share of completion tokens by class over steps (think standard ids, think reasoning
  ids, outside think: the trainer's `<class>_tokens` diagnostics), and the copies sampled most over the run
  (reasoning_usage.json) with their source tokens and kinds (digit, operator, word, …): which tokens migrate first;
- trace.html: the latest logged samples, the think block shaded and the reasoning tokens (⟦…⟧ runs) highlighted.
With two run directories training.png, entropy.png and reasoning_share.png draw both (colour = run); drift and trace
are RUN_DIR's. A picture whose data the runs lack (a baseline has no copies) is skipped with a note, never an error.
Curves of more than 60 points are drawn faint, with their trailing mean over about 1/30 of the run on top.
"""

import argparse
import html
import json
import math
import re
import unicodedata
from pathlib import Path

import torch as th
from safetensors import safe_open
from transformers import AutoTokenizer

import data
import vocab as rvocab
from checkpoints import checkpoint_dirs, step_of
from policy import CLASSES

STYLE = {
    "font.size": 11,
    "axes.titlesize": 12,
    "axes.labelsize": 11,
    "legend.fontsize": 9,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.formatter.useoffset": False,  # 11.9228, not 0.0028 + 1.192e1
}
TOP_TOKENS = 20  # copies listed in drift.png / drift.json
RTL = ("R", "AL", "AN")  # unicodedata.bidirectional classes of right-to-left characters


def figure_class():
    """matplotlib's Figure (drawn off-screen, no pyplot state), or an ImportError naming the extra to install."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError(
            "plots.py needs matplotlib, which comes with the optional extra `plot`: "
            "`uv run --extra plot python plots.py RUN_DIR` (or `pip install 'reasoning-grpo[plot]'`)"
        ) from e
    from matplotlib.figure import Figure

    matplotlib.rcParams.update(STYLE)
    return Figure


def save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


# ---------------------------------------------------------------------------------------------------------------------
# Reading a run


def read_metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl as a list of dicts (one per line; eval lines may hold only `step` and eval_* keys)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a grpo.train output_dir?")
    lines = []
    for n, text in enumerate(path.read_text().splitlines(), 1):
        if text.strip():
            try:
                lines.append(json.loads(text))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n} is not a JSON line: {e}") from e
    return lines


def series(metrics: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key`, from the lines that have it."""
    pairs = [(m["step"], float(m[key])) for m in metrics if m.get(key) is not None]
    return [s for s, _ in pairs], [v for _, v in pairs]


def run_config(run_dir: Path) -> dict:
    """The run's trainer options as grpo.train saved them in config.json; {} when there is none."""
    path = Path(run_dir) / "config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def run_label(name: str, run_dir: Path, metrics: list[dict]) -> str:
    """The run's name and vocabulary, e.g. 'rv (reasoning vocab: all)' or 'base (baseline)'."""
    size = run_config(run_dir).get("reasoning_vocab_size")
    if size is None:  # no config: a reasoning run logs reasoning_frac
        kind = "reasoning vocab" if any("reasoning_frac" in m for m in metrics) else "baseline"
    else:
        kind = "baseline" if size == 0 else "reasoning vocab: " + ("all" if size == rvocab.ALL_REGULAR else str(size))
    return f"{name} ({kind})"


def note(text: str) -> None:
    print(f"[plots] {text}", flush=True)


# ---------------------------------------------------------------------------------------------------------------------
# Curves over steps


def smoothing_window(n: int) -> int:
    """Steps per moving average for curves of n points: none up to 60 points, then about n / 30."""
    return n // 30 if n > 60 else 1


def curve(ax, steps: list[int], values: list[float], color: str, window: int, style: str = "-") -> None:
    """One run's curve: as is for window 1 (with markers for 20 points or fewer), else each step faint and the
    trailing mean of `window` steps on top."""
    if window == 1:
        ax.plot(steps, values, style, color=color, lw=1.8, marker="o" if len(values) <= 20 else None, ms=4)
        return
    ax.plot(steps, values, style, color=color, lw=0.8, alpha=0.25)
    sums = [0.0]
    for v in values:
        sums.append(sums[-1] + v)
    mean = [(sums[i + 1] - sums[max(0, i + 1 - window)]) / min(i + 1, window) for i in range(len(values))]
    ax.plot(steps, mean, style, color=color, lw=1.8)


def legends(fig, colors: dict[str, str], window: int) -> None:
    """The runs' colours {label: colour} above the panels, with the smoothing if any."""
    from matplotlib.lines import Line2D

    title = f"thick: mean of the last {window} steps, faint: each step" if window > 1 else None
    lines = [Line2D([], [], color=c, lw=2.5) for c in colors.values()]
    fig.legend(lines, list(colors), loc="outside upper center", ncols=min(len(colors), 3), title=title, frameon=False)


def legend_handles(styles: dict[str, dict]) -> tuple[list, list[str]]:
    """Grey sample lines for a legend of line styles: {label: Line2D keyword arguments}."""
    from matplotlib.lines import Line2D

    return [Line2D([], [], **{"color": "0.35", "lw": 1.8} | kw) for kw in styles.values()], list(styles)


def plot_training(runs: dict[str, list[dict]], out: Path) -> Path | None:
    """training.png: reward, accuracy (+ eval accuracy) and completion length (+ think length) over steps."""
    if not any(series(m, "reward")[0] for m in runs.values()):
        note("skip training.png: no step has a reward")
        return None
    fig = figure_class()(figsize=(15, 4.6), layout="constrained")
    ax_reward, ax_acc, ax_len = fig.subplots(1, 3, sharex=True)
    window = smoothing_window(max(len(m) for m in runs.values()))
    evals, has_think = {}, False  # legend entries of the evaluation markers; whether a run logs think lengths
    for i, metrics in enumerate(runs.values()):
        color = f"C{i}"
        curve(ax_reward, *series(metrics, "reward"), color, window)
        curve(ax_acc, *series(metrics, "accuracy"), color, window)
        pass_at = sorted({k for m in metrics for k in m if k.startswith("eval_pass@")})
        for key, marker in [("eval_accuracy", "s"), *[(k, "^") for k in pass_at]]:
            eval_steps, values = series(metrics, key)
            if eval_steps:
                ax_acc.plot(eval_steps, values, "--", marker=marker, color=color, ms=6, mfc="white", lw=1.2)
                evals[f"evaluation, {key.removeprefix('eval_').replace('accuracy', 'pass@1')}"] = marker
        curve(ax_len, *series(metrics, "completion_len"), color, window)
        if series(metrics, "think_len")[0]:
            curve(ax_len, *series(metrics, "think_len"), color, window, style=":")
            has_think = True
    ax_reward.set(title="Reward (mean over samples)", xlabel="step", ylabel="reward")
    ax_acc.set(title="Accuracy", xlabel="step", ylabel="fraction correct", ylim=(-0.03, 1.03))
    ax_len.set(title="Completion length (mean)", xlabel="step", ylabel="tokens")
    legends(fig, {label: f"C{i}" for i, label in enumerate(runs)}, window)
    if evals:
        styles = {"training samples": {"ls": "-"}}
        styles.update({label: {"ls": "--", "marker": m, "mfc": "white"} for label, m in evals.items()})
        ax_acc.legend(*legend_handles(styles), loc="best")
    if has_think:
        ax_len.legend(*legend_handles({"whole completion": {"ls": "-"}, "inside think": {"ls": ":"}}), loc="best")
    return save(fig, out / "training.png")


def plot_reasoning_share(runs: dict[str, list[dict]], out: Path) -> Path | None:
    """reasoning_share.png: the share of think tokens that are reasoning ids, over steps (runs that log it)."""
    shares = {label: series(m, "reasoning_frac") for label, m in runs.items()}
    if not any(steps for steps, _ in shares.values()):
        note("skip reasoning_share.png: no run has a reasoning vocabulary (no reasoning_frac in metrics.jsonl)")
        return None
    fig = figure_class()(figsize=(8, 4.6), layout="constrained")
    ax = fig.subplots()
    window = smoothing_window(max(len(steps) for steps, _ in shares.values()))
    has_eval = False
    for i, ((steps, values), metrics) in enumerate(zip(shares.values(), runs.values(), strict=True)):
        if steps:
            curve(ax, steps, values, f"C{i}", window)
        eval_steps, eval_values = series(metrics, "eval_reasoning_share")
        if eval_steps:
            ax.plot(eval_steps, eval_values, "s--", color=f"C{i}", ms=6, mfc="white", lw=1.2)
            has_eval = True
    ax.set(title="Reasoning tokens among think tokens", xlabel="step", ylabel="share of think tokens", ylim=(0, 1))
    legends(fig, {label: f"C{i}" for i, (label, (steps, _)) in enumerate(shares.items()) if steps}, window)
    if has_eval:
        styles = {"training samples": {"ls": "-"}, "evaluation": {"ls": "--", "marker": "s", "mfc": "white"}}
        ax.legend(*legend_handles(styles), loc="best")
    return save(fig, out / "reasoning_share.png")


def plot_entropy(runs: dict[str, list[dict]], out: Path) -> Path | None:
    """entropy.png: the entropy (over text) of each run over steps, on one axis."""
    if not any(series(m, "entropy")[0] for m in runs.values()):
        note("skip entropy.png: no entropy in metrics.jsonl")
        return None
    fig = figure_class()(figsize=(8, 4.6), layout="constrained")
    ax = fig.subplots()
    window = smoothing_window(max(len(m) for m in runs.values()))
    for i, metrics in enumerate(runs.values()):
        curve(ax, *series(metrics, "entropy"), f"C{i}", window)
    ax.set(title="Policy entropy per completion token (over text)", xlabel="step", ylabel="entropy (nats)")
    legends(fig, {label: f"C{i}" for i, label in enumerate(runs)}, window)
    return save(fig, out / "entropy.png")


# ---------------------------------------------------------------------------------------------------------------------
# Embedding drift of the copies


def is_output(name: str) -> bool:
    """Whether a (V, hidden) tensor is the output layer (untied models), by its transformers name."""
    return "lm_head" in name or "output" in name


def tensor_label(name: str) -> str:
    return f"{'output layer' if is_output(name) else 'input embedding'} ({name})"


def copy_drift(checkpoint: Path) -> tuple[rvocab.ReasoningVocab | None, dict[str, th.Tensor]]:
    """The checkpoint's map and {tensor name: (n_r,) drift of each copy} for every (V, hidden) tensor in its
    safetensors files, the input embedding first; (None, {}) for a checkpoint without copies."""
    vocab = rvocab.load(checkpoint)
    if vocab is None:
        return None, {}
    files = sorted(Path(checkpoint).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{checkpoint} has no *.safetensors weights")
    drift = {}
    for file in files:
        with safe_open(file, "pt") as f:
            for name in f.keys():
                shape = f.get_slice(name).get_shape()
                if len(shape) == 2 and shape[0] == vocab.total_size:
                    drift[name] = rvocab.row_drift(f.get_tensor(name), vocab)
    if not drift:
        raise ValueError(f"{checkpoint}: no weight has n_s + n_r = {vocab.total_size} rows, the map's vocabulary")
    order = sorted(drift, key=is_output)  # the input embedding first
    return vocab, {name: drift[name] for name in order}


def token_label(token: dict, font) -> str:
    """A drift.json token for a picture: its text quoted so that spaces show (its vocabulary entry when it is part of
    a multi-byte character), escaped where `font` has no glyph or a character would reorder or combine with the
    label (right-to-left scripts, combining marks), then its id and which copy it is."""
    text = token["piece"] if "\ufffd" in token["token"] else token["token"]
    plain = all(
        font.get_char_index(ord(c)) and not unicodedata.combining(c) and unicodedata.bidirectional(c) not in RTL
        for c in text
    )
    shown = repr(text) if plain else ascii(text)
    return f"{shown} {token['source_id']:>6}" + (f" copy {token['copy']}" if token["copy"] > 1 else "")


def drift_report(run_dir: Path, out: Path) -> tuple[dict, dict[str, th.Tensor]] | None:
    """drift.json (summary per tensor and the copies that moved most, ranked by the first tensor) and the drifts."""
    checkpoints = checkpoint_dirs(Path(run_dir))
    if not checkpoints:
        return None
    vocab, drift = copy_drift(checkpoints[-1])
    if vocab is None:
        return None
    tokenizer = AutoTokenizer.from_pretrained(checkpoints[-1])
    summary = {}
    for name, d in drift.items():
        summary[name] = {
            "mean": float(d.mean()),
            "median": float(d.median()),
            "max": float(d.max()),
            "frac_moved": float((d > 0).float().mean()),  # copies whose row differs from their source's at all
        }
    ranked = next(iter(drift.values())).argsort(descending=True)[:TOP_TOKENS]
    copy_rank = vocab.multiplicity(ranked + vocab.standard_size)
    top = [
        {
            "reasoning_id": vocab.standard_size + int(i),
            "source_id": int(vocab.source_ids[i]),
            "token": tokenizer.decode([int(vocab.source_ids[i])]),
            "piece": tokenizer.convert_ids_to_tokens(int(vocab.source_ids[i])),  # the vocabulary entry
            "copy": int(k),  # the k-th copy of its source
            "drift": {name: float(d[i]) for name, d in drift.items()},
        }
        for i, k in zip(ranked.tolist(), copy_rank.tolist(), strict=True)
    ]
    report = {
        "checkpoint": str(checkpoints[-1]),
        "step": step_of(checkpoints[-1]),
        "standard_size": vocab.standard_size,
        "copies": vocab.size,
        "summary": summary,
        "top": top,
    }
    (out / "drift.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    return report, drift


def plot_drift(run_dir: Path, out: Path) -> Path | None:
    """drift.png (+ drift.json): histogram of the copies' drift, the copies that moved most, mean drift over steps."""
    made = drift_report(run_dir, out)
    if made is None:
        note(f"skip drift.png: {run_dir} has no checkpoint with a reasoning vocabulary")
        return None
    report, drift = made
    Figure = figure_class()
    from matplotlib import font_manager

    font = font_manager.get_font(font_manager.findfont(font_manager.FontProperties(family="monospace")))
    metrics = read_metrics(run_dir)
    over_steps = {key: series(metrics, key) for key in ("embed_drift", "unembed_drift") if series(metrics, key)[0]}
    fig = Figure(figsize=(14, 7.5 if over_steps else 4.5), layout="constrained")
    axes = fig.subplot_mosaic([["hist", "top"], ["steps", "top"]] if over_steps else [["hist", "top"]])

    ax = axes["hist"]
    for i, (name, d) in enumerate(drift.items()):
        ax.hist(d.numpy(), bins=50, color=f"C{i}", alpha=0.6 if len(drift) > 1 else 0.9, label=tensor_label(name))
        moved = report["summary"][name]["frac_moved"]
        ax.axvline(
            float(d.mean()), color=f"C{i}", ls="--", lw=1.2, label=f"mean {float(d.mean()):.3g}; {moved:.1%} moved"
        )
    ax.set_yscale("log")
    ax.set(xlabel="‖copy row − source row‖₂", ylabel="copies (log scale)")
    ax.set_title(f"Drift of the {report['copies']:,} copies from their sources at step {report['step']}")
    ax.legend(loc="best")

    ax = axes["top"]
    top = report["top"]
    first = next(iter(drift))
    labels = [token_label(t, font) for t in top]
    ax.barh(range(len(top)), [t["drift"][first] for t in top], color="C1")
    ax.set_yticks(range(len(top)), labels, fontfamily="monospace")
    ax.invert_yaxis()  # largest on top
    ax.grid(axis="y", visible=False)
    moved = report["summary"][first]["max"] > 0  # else the ranking is arbitrary
    title = f"The {len(top)} copies that moved most" if moved else "No copy has moved from its source yet"
    ax.set(xlabel=f"‖copy row − source row‖₂, {tensor_label(first)}", title=title)
    ax.set_ylabel("source token, id")

    if over_steps:
        ax = axes["steps"]
        window = smoothing_window(max(len(steps) for steps, _ in over_steps.values()))
        for i, (steps, values) in enumerate(over_steps.values()):
            curve(ax, steps, values, f"C{i}", window)
        ax.set(title="Mean drift of the copies over training", xlabel="step", ylabel="mean ‖copy − source‖₂")
        names = {"embed_drift": "input embedding", "unembed_drift": "output layer"}
        ax.legend(*legend_handles({names[key]: {"color": f"C{i}"} for i, key in enumerate(over_steps)}), loc="best")
    return save(fig, out / "drift.png")


# ---------------------------------------------------------------------------------------------------------------------
# Trace


_TAGS = re.compile(f"({re.escape(rvocab.THINK)}|{re.escape(rvocab.END_THINK)}|{rvocab.MARK_OPEN}|{rvocab.MARK_CLOSE})")
TRACE_CSS = """
body { font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem; line-height: 1.5; }
.sample { border: 1px solid #ccc; border-radius: 6px; padding: 0.6rem 1rem; margin: 1.2rem 0; }
.meta { color: #555; font-size: 0.9rem; }
.text { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 0.9rem; white-space: pre-wrap;
        overflow-wrap: anywhere; background: #fafafa; padding: 0.6rem; border-radius: 4px; }
.think { background: #e3ecf9; color: #223; }
.tag { color: #5a6f99; font-weight: bold; }
mark.r { background: #ffc870; color: #000; border-bottom: 2px solid #d97a00; border-radius: 2px; }
"""


OPENED_BY_PROMPT = '<span class="tag" title="opened by the prompt">(&lt;think&gt;)</span>'


# ---------------------------------------------------------------------------------------------------------------------
# Usage of the copies


def token_kind(text: str) -> str:
    """A source token's kind: digit, operator (punctuation and symbols: + = \\ ^ …), word, space, or other."""
    text = text.strip()
    if not text:
        return "space"
    if text.isdigit():
        return "digit"
    if all(unicodedata.category(c)[0] in "PS" for c in text):
        return "operator"
    return "word" if text.isalpha() else "other"


def usage_report(run_dir: Path, out: Path) -> dict | None:
    """usage.json: the copies sampled most over the run (reasoning_usage.json, written with each checkpoint) with
    their source tokens and kinds, and the share of all copy samples by kind; None without the counts."""
    path, checkpoints = Path(run_dir) / "reasoning_usage.json", checkpoint_dirs(Path(run_dir))
    if not path.is_file() or not checkpoints:
        return None
    usage = json.loads(path.read_text())
    vocab = rvocab.load(checkpoints[-1])
    tokenizer = AutoTokenizer.from_pretrained(checkpoints[-1])
    counts = {int(i): n for i, n in usage["counts"].items()}
    total = max(sum(counts.values()), 1)
    text_of = {i: tokenizer.decode([int(vocab.source_ids[i])]) for i in counts}
    by_kind: dict[str, int] = {}
    for i, n in counts.items():
        by_kind[token_kind(text_of[i])] = by_kind.get(token_kind(text_of[i]), 0) + n
    top = [{"reasoning_id": vocab.standard_size + i, "source_id": int(vocab.source_ids[i]), "token": text_of[i],
            "kind": token_kind(text_of[i]), "count": n, "share": n / total}
           for i, n in sorted(counts.items(), key=lambda kv: -kv[1])[:TOP_TOKENS]]  # fmt: skip
    report = {"step": usage["step"], "copies": usage["copies"], "copies_used": len(counts), "samples": sum(counts.values()),
              "share_by_kind": {k: n / total for k, n in sorted(by_kind.items(), key=lambda kv: -kv[1])}, "top": top}  # fmt: skip
    (out / "usage.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    return report


def plot_usage(runs: dict[str, list[dict]], run_dir: Path, out: Path) -> Path | None:
    """usage.png (+ usage.json): token share by class over steps (RUN_DIR's run), and the copies sampled most."""
    metrics = next(iter(runs.values()))
    rows = [m for m in metrics if f"{CLASSES[0]}_tokens" in m]
    if not rows:
        note("skip usage.png: no per-class token counts in metrics.jsonl (a run without a reasoning vocabulary)")
        return None
    report = usage_report(run_dir, out)
    fig = figure_class()(figsize=(15, 4.8), layout="constrained")
    ax_share, ax_top = fig.subplots(1, 2, width_ratios=(1, 1.2))
    totals = [max(sum(m[f"{c}_tokens"] for c in CLASSES), 1.0) for m in rows]
    window = smoothing_window(len(rows))
    for k, name in enumerate(CLASSES):
        shares = [m[f"{name}_tokens"] / t for m, t in zip(rows, totals, strict=True)]
        curve(ax_share, [m["step"] for m in rows], shares, f"C{k}", window)
    ax_share.set(title="Completion tokens by class", xlabel="step", ylabel="share of tokens", ylim=(0, 1))
    styles = {name.replace("_", " "): {"color": f"C{k}"} for k, name in enumerate(CLASSES)}
    ax_share.legend(*legend_handles(styles), loc="best")
    if report and report["top"]:
        top = report["top"][::-1]
        kinds = sorted({t["kind"] for t in top})
        colors = [f"C{3 + kinds.index(t['kind'])}" for t in top]
        ax_top.barh(range(len(top)), [t["count"] for t in top], color=colors)
        ax_top.set_yticks(range(len(top)), [f"{t['token']!r} {t['source_id']}" for t in top], fontsize=8)
        ax_top.set(title=f"Copies sampled most (to step {report['step']}; {report['copies_used']} of "
                   f"{report['copies']} ever used)", xlabel="times sampled")  # fmt: skip
        kind_styles = {kind: {"color": f"C{3 + i}", "lw": 6} for i, kind in enumerate(kinds)}
        ax_top.legend(*legend_handles(kind_styles), loc="lower right")
    else:
        ax_top.set_axis_off()
        ax_top.set_title("no copy sampled yet (reasoning_usage.json)")
    return save(fig, out / "usage.png")


def prompt_opens_think(run_dir: Path) -> bool | None:
    """Whether the run's prompts end inside a think block (its completions then start inside), from the latest
    checkpoint's tokenizer and the run's prompt options; None without a checkpoint."""
    checkpoints = checkpoint_dirs(Path(run_dir))
    if not checkpoints:
        return None
    tokenizer = AutoTokenizer.from_pretrained(checkpoints[-1])
    tags = rvocab.think_tag_ids(tokenizer)
    if tags is None or not getattr(tokenizer, "chat_template", None):
        return False
    config = run_config(run_dir)
    options = {k: config[k] for k in ("system_prompt", "instruction", "few_shot", "enable_thinking") if k in config}
    row = {"problem": "1 + 1", "answer": "2", "index": 0}
    example = data.build_examples([row], tokenizer, max_prompt_len=math.inf, **options)[0]
    return rvocab.opens_think(example.prompt_ids, *tags)


def completion_html(text: str, inside: bool) -> str:
    """A completion as HTML: the think block in a shaded span, each ⟦…⟧ run of reasoning tokens in a <mark>, the text
    escaped. `inside`: whether the completion starts inside a think block."""
    parts = [f'<span class="think">{OPENED_BY_PROMPT}'] if inside else []
    marked = False
    for piece in _TAGS.split(text):
        if piece == rvocab.MARK_OPEN and not marked:
            parts.append('<mark class="r" title="reasoning-vocabulary tokens">')
            marked = True
        elif piece == rvocab.MARK_CLOSE and marked:
            parts.append("</mark>")
            marked = False
        elif piece == rvocab.THINK and not inside and not marked:
            parts.append(f'<span class="think"><span class="tag">{html.escape(piece)}</span>')
            inside = True
        elif piece == rvocab.END_THINK and inside and not marked:
            parts.append(f'<span class="tag">{html.escape(piece)}</span></span>')
            inside = False
        else:
            parts.append(html.escape(piece))
    return "".join(parts) + ("</mark>" if marked else "") + ("</span>" if inside else "")


def render_trace(run_dir: Path, out: Path) -> Path | None:
    """trace.html: the samples of the latest step in samples.jsonl (problem, answer, reward, completion)."""
    path = Path(run_dir) / "samples.jsonl"
    samples = [json.loads(s) for s in path.read_text().splitlines() if s.strip()] if path.is_file() else []
    if not samples:
        note(f"skip trace.html: {run_dir} has no samples.jsonl (written every --sample-every steps)")
        return None
    step = max(s["step"] for s in samples)
    latest = [s for s in samples if s["step"] == step]
    opens = prompt_opens_think(run_dir)
    blocks = []
    for n, s in enumerate(latest, 1):
        completion = s["completion"]
        # Without a checkpoint to read the prompts from: a completion whose first tag closes the block began inside.
        first_tag = next((t for t in _TAGS.findall(completion) if t in (rvocab.THINK, rvocab.END_THINK)), None)
        inside = opens if opens is not None else first_tag == rvocab.END_THINK
        blocks.append(
            f'<div class="sample"><div class="meta">sample {n} · reward <b>{s["reward"]:.3g}</b> · '
            f"answer <b>{html.escape(str(s['answer']))}</b> · {completion.count(rvocab.MARK_OPEN)} reasoning runs</div>"
            f"<p>{html.escape(s['problem'])}</p>"
            f'<div class="text">{completion_html(completion, inside)}</div></div>'
        )
    name = html.escape(Path(run_dir).resolve().name)
    page = (
        f'<!doctype html>\n<html><head><meta charset="utf-8"><title>{name}: samples at step {step}</title>'
        f"<style>{TRACE_CSS}</style></head><body>\n<h1>{name}: samples at step {step}</h1>\n"
        f'<p><span class="think">shaded: inside the think block</span> · '
        f'<mark class="r">highlighted</mark>: reasoning-vocabulary tokens, shown as the tokens they copy</p>\n'
        + "\n".join(blocks)
        + "\n</body></html>\n"
    )
    (out / "trace.html").write_text(page)
    return out / "trace.html"


# ---------------------------------------------------------------------------------------------------------------------
# Command line


def make_all(run_dirs: list[Path], out: Path) -> list[Path]:
    """Every picture for one run, or for a run beside a baseline; returns the files made (drift.json included)."""
    run_dirs = [Path(d) for d in run_dirs]
    for d in run_dirs:
        if not d.is_dir():
            raise FileNotFoundError(f"run directory {d} does not exist")
    metrics = [read_metrics(d) for d in run_dirs]
    names = [d.resolve().name for d in run_dirs]
    if len(set(names)) < len(names):  # two runs of the same name: tell them apart by their paths
        names = [str(d) for d in run_dirs]
    labels = [run_label(*args) for args in zip(names, run_dirs, metrics, strict=True)]
    runs = dict(zip(labels, metrics, strict=True))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    made = [plot_training(runs, out), plot_reasoning_share(runs, out), plot_entropy(runs, out)]
    drift_png = plot_drift(run_dirs[0], out)
    usage_png = plot_usage(runs, run_dirs[0], out)
    made += [drift_png, out / "drift.json" if drift_png else None, usage_png]
    made += [
        out / "usage.json" if usage_png and (out / "usage.json").exists() else None,
        render_trace(run_dirs[0], out),
    ]
    return [p for p in made if p is not None]


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(
        description="Analysis pictures of a GRPO run (training curves, reasoning share, entropy, copy drift, trace)."
    )
    parser.add_argument("run_dir", type=Path, help="a grpo.train output_dir")
    parser.add_argument("baseline_dir", type=Path, nargs="?", help="a second run to draw beside it (e.g. the baseline)")
    parser.add_argument("--out", type=Path, help="where to write the pictures (default: RUN_DIR/plots)")
    args = parser.parse_args(argv)
    run_dirs = [args.run_dir] + ([args.baseline_dir] if args.baseline_dir else [])
    made = make_all(run_dirs, args.out or args.run_dir / "plots")
    for path in made:
        print(path)
    return made


if __name__ == "__main__":
    main()
