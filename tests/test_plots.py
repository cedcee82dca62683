"""plots.py on the outputs of two short real runs, one with every regular token copied and its baseline: every
picture is made and is a real image, drift.json lists real copies with the drift their weights have, the trace
highlights exactly the reasoning runs of the samples, and a baseline alone skips what it has no data for."""

import json
import sys

import pytest
import torch as th
from PIL import Image

import checkpoints
import grpo
import plots
import vocab as rvocab
from tests.conftest import tiny_model, weights_of
from tests.test_grpo import letter_e, run_cfg

PNGS = {"training.png", "entropy.png", "reasoning_share.png", "drift.png", "usage.png"}


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tiny_tokenizer):
    """(reasoning run, baseline run): 2 steps each from the same tiny model, a sample table and drift every step,
    with eval lines as periodic evaluation writes them (step 0 holds eval keys only)."""
    root = tmp_path_factory.mktemp("plots")
    model = tiny_model(len(tiny_tokenizer) + 4, seed=1)
    model.generation_config.eos_token_id = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.save_pretrained(root / "model")
    tiny_tokenizer.save_pretrained(root / "model")
    dirs = []
    for name, size in (("rv", rvocab.ALL_REGULAR), ("base", 0)):
        cfg = run_cfg(root / "model", root / name, reasoning_vocab_size=size, steps=2, prompts_per_step=4,
                      group_size=4, max_new_tokens=16, rollout_batch_size=16, micro_batch_size=16, sample_every=1,
                      save_every=2)  # fmt: skip
        out = grpo.train(cfg, score_fn=letter_e)
        lines = (out / "metrics.jsonl").read_text().splitlines()
        share = {"eval_reasoning_share": 0.5} if size else {}
        evals = [json.dumps({"step": s, "eval_accuracy": 0.25 * s, "eval_pass@4": 0.3 * s} | share) for s in (0, 2)]
        (out / "metrics.jsonl").write_text("\n".join([evals[0], *lines, evals[1]]) + "\n")
        dirs.append(out)
    return dirs


@pytest.fixture(scope="module")
def pictures(two_runs, tmp_path_factory):
    """plots.main on (reasoning run, baseline run): the files it made."""
    rv, base = two_runs
    return plots.main([str(rv), str(base), "--out", str(tmp_path_factory.mktemp("pictures"))])


def test_pictures_of_a_reasoning_run_beside_its_baseline(pictures):
    assert {p.name for p in pictures} == PNGS | {"drift.json", "usage.json", "trace.html"}
    out = pictures[0].parent
    assert all(p.parent == out and p.stat().st_size > 0 for p in pictures)
    for name in PNGS:
        with Image.open(out / name) as image:
            image.verify()
            assert image.format == "PNG" and image.width >= 600 and image.height >= 300, (name, image.size)


def test_drift_json_lists_real_copies_with_their_weights_drift(two_runs, pictures, tiny_tokenizer):
    rv, _ = two_runs
    report = json.loads((pictures[0].parent / "drift.json").read_text())
    ckpt = checkpoints.checkpoint_dirs(rv)[-1]
    vocab = rvocab.load(ckpt)
    name = "model.embed_tokens.weight"  # tied: the only (V, hidden) tensor
    embedding = weights_of(ckpt)[name]
    assert report["step"] == 2 and report["copies"] == vocab.size and list(report["summary"]) == [name]
    drifts = [t["drift"][name] for t in report["top"]]
    assert len(drifts) == min(plots.TOP_TOKENS, vocab.size) and drifts == sorted(drifts, reverse=True)
    for t in report["top"]:
        i = t["reasoning_id"] - vocab.standard_size
        assert 0 <= i < vocab.size and int(vocab.source_ids[i]) == t["source_id"]
        assert t["token"] == tiny_tokenizer.decode([t["source_id"]])
        expected = float((embedding[t["reasoning_id"]] - embedding[t["source_id"]]).norm())
        assert t["drift"][name] == pytest.approx(expected, rel=1e-5)
    all_drift = (embedding[vocab.standard_size :] - embedding[vocab.source_ids]).norm(dim=1)
    summary = report["summary"][name]
    assert summary["max"] == pytest.approx(float(all_drift.max()), rel=1e-5) == drifts[0]
    # The trainer logged the mean drift of the same weights (step 2 is logged, then checkpointed).
    logged = [m for m in plots.read_metrics(rv) if "embed_drift" in m][-1]
    assert logged["step"] == 2 and summary["mean"] == pytest.approx(logged["embed_drift"], rel=1e-5)
    assert 0 < summary["mean"] and 0 < summary["frac_moved"] <= 1


def test_usage_json_counts_the_copies_the_run_sampled(two_runs, pictures, tiny_tokenizer):
    rv, _ = two_runs
    report = json.loads((pictures[0].parent / "usage.json").read_text())
    logged = [m for m in plots.read_metrics(rv) if "think_reasoning_tokens" in m]
    assert report["step"] == 2 and report["samples"] == sum(m["think_reasoning_tokens"] for m in logged) > 0
    vocab = rvocab.load(checkpoints.checkpoint_dirs(rv)[-1])
    counts = [t["count"] for t in report["top"]]
    assert counts == sorted(counts, reverse=True) and report["copies"] == vocab.size
    for t in report["top"]:
        assert int(vocab.source_ids[t["reasoning_id"] - vocab.standard_size]) == t["source_id"]
        assert t["token"] == tiny_tokenizer.decode([t["source_id"]]) and t["kind"] == plots.token_kind(t["token"])
    assert sum(report["share_by_kind"].values()) == pytest.approx(1.0)


def test_token_kinds():
    kinds = [plots.token_kind(s) for s in ("7", " 42", "+", " \\frac", "=", " the", "  ", "x2")]
    assert kinds == ["digit", "digit", "operator", "other", "operator", "word", "space", "other"]


def test_trace_highlights_every_reasoning_run_of_the_latest_samples(two_runs, pictures):
    rv, _ = two_runs
    samples = [json.loads(s) for s in (rv / "samples.jsonl").read_text().splitlines()]
    latest = [s for s in samples if s["step"] == 2]
    runs = sum(s["completion"].count(rvocab.MARK_OPEN) for s in latest)
    page = (pictures[0].parent / "trace.html").read_text()
    assert runs > 0  # half of the think tokens are copies at the start
    assert page.count('<mark class="r" title') == runs and rvocab.MARK_OPEN not in page
    assert page.count('<div class="sample">') == len(latest) and "samples at step 2" in page
    assert page.count(plots.OPENED_BY_PROMPT) == len(latest)  # the tiny chat template opens the think block


def test_completion_html_escapes_text_and_nests_think_and_marks():
    mark = '<mark class="r" title="reasoning-vocabulary tokens">'
    page = plots.completion_html("a<b>&c ⟦x⟧</think>\\boxed{1} <think>", inside=True)
    assert page == (
        '<span class="think"><span class="tag" title="opened by the prompt">(&lt;think&gt;)</span>'
        f'a&lt;b&gt;&amp;c {mark}x</mark><span class="tag">&lt;/think&gt;</span></span>\\boxed{{1}} '
        '<span class="think"><span class="tag">&lt;think&gt;</span></span>'
    )
    assert plots.completion_html("⟦<i>", inside=False) == f"{mark}&lt;i&gt;</mark>"  # unclosed: closed at the end


def test_copy_drift_of_an_untied_checkpoint_reads_both_layers(tmp_path, tiny_tokenizer):
    model = tiny_model(len(tiny_tokenizer) + 4, seed=3, tie=False)
    vocab = rvocab.add_reasoning_vocab(model, tiny_tokenizer, 10)
    n_s = vocab.standard_size
    with th.no_grad():  # move copy 2's input row by 3 and copy 7's output row by 4 (a 3-4-5 step)
        model.get_input_embeddings().weight[n_s + 2, :2] += th.tensor([3.0, 0.0])
        model.get_output_embeddings().weight[n_s + 7, :2] += th.tensor([3.0, 4.0])
    model.save_pretrained(tmp_path)
    rvocab.save_map(vocab, tmp_path)
    loaded, drift = plots.copy_drift(tmp_path)
    assert loaded == vocab and list(drift) == ["model.embed_tokens.weight", "lm_head.weight"]
    expected_in, expected_out = th.zeros(10), th.zeros(10)
    expected_in[2], expected_out[7] = 3.0, 5.0
    assert th.allclose(drift["model.embed_tokens.weight"], expected_in, atol=1e-5)
    assert th.allclose(drift["lm_head.weight"], expected_out, atol=1e-5)


def test_baseline_alone_skips_drift_and_reasoning_share(two_runs, tmp_path, capsys):
    _, base = two_runs
    made = plots.main([str(base), "--out", str(tmp_path)])
    assert {p.name for p in made} == {"training.png", "entropy.png", "trace.html"}
    out = capsys.readouterr().out
    assert "skip drift.png" in out and "skip reasoning_share.png" in out and "skip usage.png" in out
    assert not (tmp_path / "drift.png").exists() and not (tmp_path / "drift.json").exists()


def test_series_keeps_only_lines_with_the_key():
    metrics = [
        {"step": 0, "eval_accuracy": 0.5},
        {"step": 1, "reward": 0.1, "entropy": 2.0},
        {"step": 2, "reward": 0.3},
    ]
    assert plots.series(metrics, "reward") == ([1, 2], [0.1, 0.3])
    assert plots.series(metrics, "eval_accuracy") == ([0], [0.5])
    assert plots.series(metrics, "entropy") == ([1], [2.0])


def test_bad_inputs_get_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        plots.main([str(tmp_path / "nowhere")])
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        plots.main([str(tmp_path)])
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "reward": 0.5}\n{"step": 2, "rew\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2"):
        plots.main([str(tmp_path)])
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if the `plot` extra were not installed
    with pytest.raises(ImportError, match="extra `plot`"):
        plots.figure_class()
