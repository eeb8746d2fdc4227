"""The quality experiment's last two stages (see run.sh): greedy answers, and the committed results.

    python benchmarks/quality/collect.py answers --run runs/quality
    python benchmarks/quality/collect.py collect --run runs/quality [--out docs/results]

`answers` writes, for every budget point whose two snapshots exist, the greedy answers of the
full model, the pruned baseline and OverFill to the same fixed prompts ($RUN/eval/answers-*.json).
`collect` copies the evaluation records and the snapshots' training state into
docs/results/quality_evals/ (small JSON, committed, so that a later session on a new machine
keeps them), and turns them into docs/results/quality.json (the form of issue #12), a markdown
table per point (quality_tables.md) and the two plots, from whatever points are done. A point
already in quality.json whose records are not in the archive (measured before the archive
existed) is kept as it is, with the machine it was measured on.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

FULL = "smollm2-135m-instruct"
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in two sentences why the sky is blue.",
    "Give me three tips for a job interview.",
    "What is 12 times 7?",
]
MAX_NEW_TOKENS = 48
# The machine of the points measured before evaluation records carried one.
MACHINE_BEFORE_ARCHIVE = "2-core AMD EPYC, AVX512-BF16 (no AMX)"


def points(archive: Path) -> list[tuple[str, int, float]]:
    """(label, tokens, kd_weight) of every point whose two evaluations exist, in budget order."""
    found = []
    for path in sorted(archive.glob("overfill-*.json")):
        label = path.stem.removeprefix("overfill-")
        if not (archive / f"pruned-{label}.json").is_file() or not (archive / f"train-overfill-{label}.json").is_file():
            continue
        kd = 0.5 if label.startswith("kd-") else 0.0
        found.append((label, int(label.removeprefix("kd-")), kd))
    return sorted(found, key=lambda p: (p[1], p[2]))


def snapshot(run: Path, mode: str, label: str) -> Path:
    kd = label.startswith("kd-")
    tokens = label.removeprefix("kd-")
    return run / f"train-{mode}{'-kd' if kd else ''}" / "snapshots" / f"tokens-{tokens}"


def answers(run: Path) -> None:
    import torch

    from overfill.generate import SamplingParams, generate
    from overfill.two_stage import TwoStageModel

    params = SamplingParams(max_new_tokens=MAX_NEW_TOKENS)
    dtype = torch.bfloat16

    def answer(model) -> list[str]:
        return [r.text for r in generate(model, PROMPTS, params)]

    full_file = run / "eval" / "answers-full.json"
    if not full_file.is_file():
        full_file.write_text(json.dumps(answer(TwoStageModel.from_refs(FULL, dtype=dtype)), indent=2))
    labels = sorted({p.name.removeprefix("tokens-") for p in (run / "train-overfill").glob("snapshots/tokens-*")})
    labels += [f"kd-{p.name.removeprefix('tokens-')}" for p in (run / "train-overfill-kd").glob("snapshots/tokens-*")]
    for label in labels:
        out = run / "eval" / f"answers-{label}.json"
        pruned, overfill = snapshot(run, "pruned", label), snapshot(run, "overfill", label)
        if out.is_file() or not (pruned.is_dir() and overfill.is_dir()):
            continue
        out.write_text(json.dumps({
            "pruned": answer(TwoStageModel.from_refs(str(pruned), dtype=dtype)),
            "overfill": answer(TwoStageModel.from_pretrained(overfill, full=FULL, dtype=dtype)),
        }, indent=2))
        print(f"answers {label} -> {out}")


def machine(host: dict) -> str:
    """The CPU an evaluation record ran on, as its host facts give it."""
    if "cpu" not in host:
        return MACHINE_BEFORE_ARCHIVE
    return f"{host['cpus']}-core {host['cpu']}" + (f", {host['cuda']}" if host.get("cuda") else "")


def archive_run(run: Path, archive: Path) -> None:
    """Copy the run's evaluation records, answers and snapshot states into the committed archive."""
    archive.mkdir(parents=True, exist_ok=True)
    for path in (run / "eval").glob("*.json"):
        shutil.copy2(path, archive / path.name)
    for path in run.glob("train-*/snapshots/tokens-*/snapshot.json"):
        train_dir, label = path.parents[2].name, path.parent.name.removeprefix("tokens-")  # train-pruned-kd, 1500000
        mode, kd = train_dir.removeprefix("train-").removesuffix("-kd"), train_dir.endswith("-kd")
        shutil.copy2(path, archive / f"train-{mode}-{'kd-' if kd else ''}{label}.json")


def closure(full: float, pruned: float, overfill: float) -> float | None:
    gap = full - pruned
    return (overfill - pruned) / gap if abs(gap) > 1e-12 else None


def point_record(archive: Path, label: str, tokens: int, kd: float, full: dict) -> dict:
    pruned = json.loads((archive / f"pruned-{label}.json").read_text())
    overfill = json.loads((archive / f"overfill-{label}.json").read_text())
    tasks = {name: {"docs": full["tasks"][name]["samples"], "full": full["tasks"][name]["acc"],
                    "pruned": pruned["tasks"][name]["acc"], "overfill": overfill["tasks"][name]["acc"],
                    "stderr": overfill["tasks"][name].get("acc_stderr")}
             for name in full["tasks"]}
    average = {k: sum(t[k] for t in tasks.values()) / len(tasks) for k in ("full", "pruned", "overfill")}
    chat = {"full": {"ppl": full["chat"]["perplexity"]}}
    for name, record in (("pruned", pruned), ("overfill", overfill)):
        c = record["chat"]
        chat[name] = {"ppl": c["perplexity"], "top1_agreement": c["top1_agreement"], "kl_from_full": c["kl_from_full"],
                      "greedy_matching_tokens": c["greedy_matching_tokens"]}
    state = {mode: json.loads((archive / f"train-{mode}-{label}.json").read_text()) for mode in ("pruned", "overfill")}
    answers_file = archive / f"answers-{label}.json"
    record = {"tokens": tokens, "kd_weight": kd, "tasks": tasks, "average": average,
              "closure": closure(average["full"], average["pruned"], average["overfill"]), "chat": chat,
              "tokens_seen": state["overfill"]["tokens"], "steps": state["overfill"]["step"],
              "train_seconds": {m: round(s["train_seconds"]) for m, s in state.items()},
              "eval_seconds": {"pruned": pruned["timings"]["total_s"], "overfill": overfill["timings"]["total_s"]},
              "machine": machine(overfill["timings"]["host"])}
    if answers_file.is_file():
        full_answers = json.loads((archive / "answers-full.json").read_text())
        theirs = json.loads(answers_file.read_text())
        record["answers"] = [{"prompt": p, "full": f, "pruned": a, "overfill": b}
                             for p, f, a, b in zip(PROMPTS, full_answers, theirs["pruned"], theirs["overfill"])]
    return record


def table(point: dict) -> str:
    kd = f", KD weight {point['kd_weight']:g}" if point["kd_weight"] else ""
    lines = [f"### {point['tokens']:,} training tokens per decoder{kd} ({point['steps']} steps)", "",
             "| task | docs | full | pruned | OverFill |", "|---|---:|---:|---:|---:|"]
    for name, t in point["tasks"].items():
        lines.append(f"| {name} | {t['docs']} | {t['full']:.3f} | {t['pruned']:.3f} | {t['overfill']:.3f} |")
    a, c = point["average"], point["chat"]
    closure_text = "n/a" if point["closure"] is None else f"{point['closure']:.2f}"
    lines += [f"| **average** | | **{a['full']:.3f}** | **{a['pruned']:.3f}** | **{a['overfill']:.3f}** |",
              f"| chat response perplexity | 200 chats | {c['full']['ppl']:.2f} | {c['pruned']['ppl']:.2f} | "
              f"{c['overfill']['ppl']:.2f} |",
              f"| top-1 agreement with full | | 1 | {c['pruned']['top1_agreement']:.3f} | "
              f"{c['overfill']['top1_agreement']:.3f} |", "",
              f"Closure `(OverFill - pruned) / (full - pruned)` on the average: **{closure_text}**.", ""]
    if "answers" in point:
        lines += ["| prompt | full | pruned | OverFill |", "|---|---|---|---|"]
        for a in point["answers"]:
            cells = [a[k].replace("\n", " ").replace("|", "\\|")[:160] for k in ("prompt", "full", "pruned", "overfill")]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


MULTI_TOKEN_TASKS = ("arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande")
"""The tasks whose answers are more than one token: there OverFill's score is the decoder's own (its first
token is the full model's, which decides BoolQ's one-token answers and many of LAMBADA's)."""


def summary_table(points_: list[dict]) -> str:
    """One row per point: the averages, the closure on all 7 tasks and on the multi-token ones, chat."""
    lines = ["| tokens per decoder | KD | steps | average: full / pruned / OverFill | closure | "
             "closure, 5 multi-token tasks | chat ppl: pruned / OverFill (full {:.2f}) | top-1 agreement: pruned / "
             "OverFill | machine |".format(points_[0]["chat"]["full"]["ppl"] if points_ else 0),
             "|---:|---:|---:|---|---:|---:|---|---|---|"]
    for p in points_:
        a, c = p["average"], p["chat"]
        multi = {k: sum(p["tasks"][t][k] for t in MULTI_TOKEN_TASKS) / len(MULTI_TOKEN_TASKS)
                 for k in ("full", "pruned", "overfill")}
        closure5 = closure(multi["full"], multi["pruned"], multi["overfill"])
        fmt = lambda x: "n/a" if x is None else f"{x:.2f}"  # noqa: E731
        lines.append(f"| {p['tokens']:,} | {p['kd_weight']:g} | {p['steps']} | {a['full']:.3f} / {a['pruned']:.3f} / "
                     f"**{a['overfill']:.3f}** | {fmt(p['closure'])} | {fmt(closure5)} | {c['pruned']['ppl']:.0f} / "
                     f"**{c['overfill']['ppl']:.0f}** | {c['pruned']['top1_agreement']:.3f} / "
                     f"{c['overfill']['top1_agreement']:.3f} | {p['machine']} |")
    return "\n".join(lines) + "\n"


def plots(points_: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    main = [p for p in points_ if not p["kd_weight"]]
    if not main:
        return
    x = [p["tokens"] for p in main]
    for key, ylabel, name, get in (
            ("acc", "average accuracy (7 tasks)", "quality_accuracy.png", lambda p, s: p["average"][s]),
            ("ppl", "chat response perplexity", "quality_ppl.png", lambda p, s: p["chat"][s]["ppl"])):
        fig, ax = plt.subplots(figsize=(6, 4))
        for system, label in (("full", "full"), ("pruned", "pruned baseline"), ("overfill", "OverFill")):
            ax.plot(x, [get(p, system) for p in main], marker="o", label=label)
        kd = [p for p in points_ if p["kd_weight"]]
        for system, marker in (("pruned", "x"), ("overfill", "+")):
            if kd:
                ax.scatter([p["tokens"] for p in kd], [get(p, system) for p in kd], marker=marker, s=80,
                           label=f"{system}, KD 0.5")
        ax.set_xscale("log")
        if key == "ppl":
            ax.set_yscale("log")
        ax.set_xlabel("training tokens per decoder (prompt + response)")
        ax.set_ylabel(ylabel)
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)


def collect(run: Path, out: Path) -> None:
    import torch

    from overfill.device import describe_machine

    archive = out / "quality_evals"
    archive_run(run, archive)
    if (run / "pruned" / "prune_record.json").is_file():
        shutil.copy2(run / "pruned" / "prune_record.json", archive / "prune_record.json")
    full = json.loads((archive / "full.json").read_text())
    prune_record = json.loads((archive / "prune_record.json").read_text())
    found = [point_record(archive, *p, full) for p in points(archive)]
    measured = {(p["tokens"], p["kd_weight"]) for p in found}
    earlier = json.loads((out / "quality.json").read_text())["points"] if (out / "quality.json").is_file() else []
    for p in earlier:
        if (p["tokens"], p["kd_weight"]) not in measured:
            found.append({**p, "machine": p.get("machine", MACHINE_BEFORE_ARCHIVE)})
    found.sort(key=lambda p: (p["tokens"], p["kd_weight"]))
    record = {
        "full": FULL,
        "decoder": {"hidden": prune_record["pruned"]["hidden_size"],
                    "intermediate": prune_record["pruned"]["intermediate_size"],
                    "parameters": prune_record["params_after"]},
        "command": "bash benchmarks/quality/run.sh",
        "machine": describe_machine(torch.device("cpu")),
        "full_eval_seconds": full["timings"]["total_s"],
        "points": found,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps(record, indent=2))
    (out / "quality_tables.md").write_text(summary_table(found) + "\n" + "\n".join(table(p) for p in found))
    plots(found, out)
    print(f"{len(found)} points -> {out / 'quality.json'}")
    for p in found:
        print(f"  {p['tokens']:>9,} kd {p['kd_weight']}: average full {p['average']['full']:.3f} pruned "
              f"{p['average']['pruned']:.3f} overfill {p['average']['overfill']:.3f} closure {p['closure']}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("stage", choices=["answers", "collect"])
    ap.add_argument("--run", default="runs/quality")
    ap.add_argument("--out", default="docs/results")
    args = ap.parse_args()
    if args.stage == "answers":
        answers(Path(args.run))
    else:
        collect(Path(args.run), Path(args.out))


if __name__ == "__main__":
    main()
