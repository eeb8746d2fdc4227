"""Reports: the results of `overfill eval` and `overfill bench` as markdown tables and plots.

Everything here reads result records (dicts, or the JSON files the commands write) and needs
neither torch nor a model: a report can be made on another machine than the run.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from .errors import OverfillError
from .files import json_loads

RESULTS_FORMAT = "overfill-eval/1"
"""The "format" of an `overfill eval` results record (`evaluate.evaluate` writes it)."""


# ---------------------------------------------------------------------------- evaluation

def load_results(path: str | os.PathLike) -> dict:
    """A results file written by `overfill eval`, checked."""
    path = Path(path)
    try:
        record = json_loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise OverfillError(f"results file {path} not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise OverfillError(f"{path} is not a results file of `overfill eval`: {e}") from None
    if not isinstance(record, dict) or record.get("format") != RESULTS_FORMAT:
        found = record.get("format") if isinstance(record, dict) else type(record).__name__
        raise OverfillError(f"{path} is not a results file of `overfill eval` (expected \"format\": "
                            f"\"{RESULTS_FORMAT}\", found {found!r}); make one with `overfill eval --out FILE`")
    return record


def _column_names(results: Sequence[dict]) -> list[str]:
    labels = [r["label"] for r in results]
    return [f"{label} ({Path(r['models']['decoder'] or r['models']['full']).name})"
            if labels.count(label) > 1 else label for label, r in zip(labels, results)]


def _shared_tasks(results: Sequence[dict]) -> list[str]:
    """The tasks every result has, in the order they were run."""
    return [n for n in results[0]["tasks"] if all(n in r["tasks"] for r in results)]


def _average_acc(result: dict, names: Sequence[str]) -> float:
    return sum(result["tasks"][n]["acc"] for n in names) / len(names)


def _cell(value: float | None, stderr: float | None = None, digits: int = 4) -> str:
    if value is None:
        return "–"
    return f"{value:.{digits}f}" + (f" ± {stderr:.{digits}f}" if stderr is not None else "")


def report_markdown(results: Sequence[dict]) -> str:
    """A markdown table: task x result (full / pruned / OverFill), with averages and chat measures."""
    columns = _column_names(results)
    lines = ["| task | metric | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]

    def row(task: str, metric: str, cells: list[str]) -> None:
        lines.append(f"| {task} | {metric} | " + " | ".join(cells) + " |")

    names = list(dict.fromkeys(name for r in results for name in r["tasks"]))
    for name in names:
        per = [r["tasks"].get(name) for r in results]
        for metric in ("acc", "acc_norm", "perplexity"):
            if any(p and metric in p for p in per):
                row(name, metric, [_cell(p.get(metric), p.get(f"{metric}_stderr")) if p else "–" for p in per])
    shared = _shared_tasks(results)
    if shared:
        row(f"**average** ({len(shared)} tasks)", "acc", [f"**{_cell(_average_acc(r, shared))}**" for r in results])
    if any(r.get("chat") for r in results):
        for key, metric in (("perplexity", "response perplexity"), ("top1_agreement", "top-1 agreement with full"),
                            ("kl_from_full", "KL(full ‖ model), nats/token"),
                            ("greedy_matching_tokens", "greedy tokens matching full")):
            row("chat", metric, [_cell(r["chat"][key], digits=3) if r.get("chat") else "–" for r in results])
    row("decode", "parameters per token", [f"{r['models']['decode_params'] / 1e6:.1f} M" for r in results])
    row("decode", "weight bytes per token (bf16)",
        [f"{r['models']['decode_bytes_bf16'] / 2**20:.0f} MiB" for r in results])
    samples = {f"{n}: {results[0]['tasks'][n]['samples']}" for n in shared}
    models = [f"- **{c}**: mode `{r['mode']}`, full `{r['models']['full']}`, decoder `{r['models']['decoder']}`, "
              f"{r['timings']['total_s']:.0f} s" for c, r in zip(columns, results)]
    return "\n".join(["# OverFill evaluation", "", *lines, "",
                      "acc ± standard error of the mean; acc_norm divides each option's log-likelihood by its "
                      "length in characters (lm-evaluation-harness's definition).", "",
                      "Documents per task: " + (", ".join(sorted(samples)) or "–"), "", *models, ""])


def plot_accuracy(results: Sequence[dict], path: str | os.PathLike) -> None:
    """Average accuracy against the parameters the decoding model reads per generated token."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shared = _shared_tasks(results)
    if not shared:
        raise OverfillError("the results share no benchmark task: nothing to plot")
    fig, ax = plt.subplots(figsize=(6, 4))
    for column, r in zip(_column_names(results), results):
        x = r["models"]["decode_params"] / 1e6
        y = 100 * _average_acc(r, shared)
        ax.scatter([x], [y], s=60)
        ax.annotate(column, (x, y), textcoords="offset points", xytext=(6, 4))
    ax.margins(0.2)
    ax.set_xlabel("decoder parameters per generated token (M); bf16 bytes = 2 x")
    ax.set_ylabel(f"average accuracy over {len(shared)} tasks (%)")
    ax.grid(alpha=0.3)
    _save(fig, Path(path))


def write_report(results: Sequence[str | os.PathLike | dict], out: str | os.PathLike) -> Path:
    """Write `out` (markdown) and its plot (`out` with .png) from results files or records."""
    records = [r if isinstance(r, dict) else load_results(r) for r in results]
    if not records:
        raise OverfillError("no results to report")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = report_markdown(records)
    if _shared_tasks(records):
        plot_accuracy(records, out.with_suffix(".png"))
        text += f"\n![average accuracy]({out.with_suffix('.png').name})\n"
    out.write_text(text)
    return out


# ---------------------------------------------------------------------------- latency

def bench_markdown(result: dict) -> str:
    """The results as markdown: one table per configuration, then the ratios."""
    lines = []
    for cfg in result["configs"]:
        lines += [f"### prompt {cfg['prompt_len']}, output {cfg['output_len']}, batch {cfg['batch_size']}", "",
                  "| system | TTFT ms | TPOT ms median | TPOT ms p90 | end-to-end s | tokens/s | floor ms | "
                  "of floor | KV KiB/token |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for label, r in cfg["runs"].items():
            lines.append(f"| {label} | {r['ttft_s'] * 1e3:.1f} | {r['tpot_s'] * 1e3:.2f} | {r['tpot_p90_s'] * 1e3:.2f} "
                         f"| {r['e2e_s']:.3f} | {r['tokens_per_s']:.1f} | {r['floor_s'] * 1e3:.2f} "
                         f"| {r['floor_fraction']:.0%} | {r['kv_bytes_per_token'] / 1024:.1f} |")
        if cfg["ratios"]:
            lines += ["", "| ratio (per round) | median | min | max |", "|---|---:|---:|---:|"]
            lines += [f"| {k} | {v['median']:.2f} | {v['min']:.2f} | {v['max']:.2f} |"
                      for k, v in cfg["ratios"].items()]
        lines.append("")
    return "\n".join(lines)


def plot_bench(result: dict, stem: Path) -> list[Path]:
    """TPOT per system (with its floor) for the first configuration, and one plot per swept axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    first = result["configs"][0]
    labels = list(first["runs"])
    fig, ax = plt.subplots(figsize=(1.2 * len(labels) + 2, 4))
    ax.bar(labels, [first["runs"][k]["tpot_s"] * 1e3 for k in labels], label="measured (median)")
    ax.scatter(labels, [first["runs"][k]["floor_s"] * 1e3 for k in labels], color="k", marker="_", s=600,
               label="memory-bandwidth floor", zorder=3)
    ax.set_ylabel("ms per output token")
    ax.set_title(f"prompt {first['prompt_len']}, output {first['output_len']}, batch {first['batch_size']} "
                 f"({result['machine'].get('gpu', result['machine']['cpu'])})", fontsize=9)
    ax.tick_params(axis="x", rotation=30)
    ax.legend()
    files.append(_save(fig, stem.with_name(stem.name + "_tpot.png")))
    for axis in ("prompt_len", "output_len", "batch_size"):
        values = sorted({c[axis] for c in result["configs"]})
        if len(values) < 2:
            continue
        others = {a: first[a] for a in ("prompt_len", "output_len", "batch_size") if a != axis}
        line = [c for c in result["configs"] if all(c[a] == v for a, v in others.items())]
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
        for label in labels:
            xs = [c[axis] for c in line]
            left.plot(xs, [c["runs"][label]["tpot_s"] * 1e3 for c in line], marker="o", label=label)
            right.plot(xs, [c["runs"][label]["tokens_per_s"] for c in line], marker="o", label=label)
        for ax, name in ((left, "ms per output token (median)"), (right, "tokens/s end to end")):
            ax.set_xscale("log", base=2)
            ax.set_xticks(values, [str(v) for v in values])
            ax.set_xlabel(axis.replace("_", " "))
            ax.set_ylabel(name)
        left.legend(fontsize=8)
        fig.suptitle(", ".join(f"{a.replace('_', ' ')} {v}" for a, v in others.items()), fontsize=9)
        files.append(_save(fig, stem.with_name(f"{stem.name}_{axis}.png")))
    return files


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
