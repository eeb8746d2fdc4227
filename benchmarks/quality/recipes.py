"""The recipe ablation's last two stages (see recipes.sh): greedy answers, and the committed results.

    python benchmarks/quality/recipes.py answers --run runs/recipes
    python benchmarks/quality/recipes.py collect --run runs/recipes [--out docs/results]

`answers` writes the greedy answers of the full model and of every trained decoder to the 5 fixed
prompts ($RUN/eval/answers-*.json). `collect` copies the evaluation records, the answers and the
runs' training summaries into docs/results/recipe_evals/ (small JSON, committed), and writes
docs/results/recipe.json and docs/results/recipe_table.md from whatever is done: per recipe and
mode the 7-task average, chat perplexity, KL(full || decoder) and top-1 agreement on 200 held-out
ShareGPT chats, the training cost, and the closure of the recipe's OverFill decoder over its baseline.
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
MODES = ("overfill", "pruned")


def trained(run: Path) -> list[tuple[str, str, Path]]:
    """(recipe, mode, directory) of every finished training run."""
    found = []
    for summary in sorted(run.glob("train/*/summary.json")):
        name = summary.parent.name
        recipe, mode = name.rsplit("-", 1)
        found.append((recipe, mode, summary.parent))
    return found


def answers(run: Path) -> None:
    import torch

    from overfill.generate import SamplingParams, generate
    from overfill.two_stage import TwoStageModel

    params, dtype = SamplingParams(max_new_tokens=MAX_NEW_TOKENS), torch.bfloat16

    def answer(model) -> list[str]:
        return [r.text for r in generate(model, PROMPTS, params)]

    full_file = run / "eval" / "answers-full.json"
    if not full_file.is_file():
        full_file.write_text(json.dumps(answer(TwoStageModel.from_refs(FULL, dtype=dtype)), indent=2))
    for recipe, mode, path in trained(run):
        out = run / "eval" / f"answers-{recipe}-{mode}.json"
        if out.is_file():
            continue
        model = (TwoStageModel.from_pretrained(path, full=FULL, dtype=dtype) if mode == "overfill"
                 else TwoStageModel.from_refs(str(path), dtype=dtype))
        out.write_text(json.dumps(answer(model), indent=2))
        print(f"answers {recipe} {mode} -> {out}")


def archive_run(run: Path, archive: Path) -> None:
    archive.mkdir(parents=True, exist_ok=True)
    for path in (run / "eval").glob("*.json"):
        shutil.copy2(path, archive / path.name)
    for recipe, mode, path in trained(run):
        shutil.copy2(path / "summary.json", archive / f"train-{recipe}-{mode}.json")
        shutil.copy2(path / "train_config.json", archive / f"config-{recipe}-{mode}.json")
    teacher = run / "teacher"
    for meta in teacher.glob("*.meta.json"):
        shutil.copy2(meta, archive / f"teacher-{meta.name}")


def decoder_record(archive: Path, recipe: str, mode: str) -> dict | None:
    evaluation, summary = archive / f"{recipe}-{mode}.json", archive / f"train-{recipe}-{mode}.json"
    if not evaluation.is_file() or not summary.is_file():
        return None
    e, s = json.loads(evaluation.read_text()), json.loads(summary.read_text())
    config = json.loads((archive / f"config-{recipe}-{mode}.json").read_text())
    accs = {name: t["acc"] for name, t in e["tasks"].items()}
    record = {"average": sum(accs.values()) / len(accs), "tasks": accs,
              "chat": {k: e["chat"][k] for k in ("perplexity", "top1_agreement", "kl_from_full",
                                                  "greedy_matching_tokens") if k in e["chat"]},
              "train": {"tokens": s["tokens"], "steps": s["steps"], "tokens_per_s": round(s["tokens_per_s"], 1),
                        "train_seconds": round(s["train_seconds"]), "precision": s.get("precision")},
              "settings": {k: config[k] for k in ("data", "ce_weight", "kd_weight", "lr", "warmup", "batch_size",
                                                  "grad_accum", "max_len", "seed")},
              "eval_seconds": e["timings"]["total_s"], "docs_per_task": {n: t["samples"] for n, t in e["tasks"].items()}}
    answers_file = archive / f"answers-{recipe}-{mode}.json"
    if answers_file.is_file():
        record["answers"] = dict(zip(PROMPTS, json.loads(answers_file.read_text())))
    return record


def collect(run: Path, out: Path) -> None:
    archive = out / "recipe_evals"
    if run.is_dir():
        archive_run(run, archive)
    full = json.loads((archive / "full.json").read_text())
    full_accs = {name: t["acc"] for name, t in full["tasks"].items()}
    full_answers = archive / "answers-full.json"
    result = {"full": {"average": sum(full_accs.values()) / len(full_accs), "tasks": full_accs,
                       "chat_perplexity": full["chat"]["perplexity"],
                       "answers": dict(zip(PROMPTS, json.loads(full_answers.read_text())))
                       if full_answers.is_file() else None},
              "machine": f"{full['timings']['host']['cpus']}-core {full['timings']['host']['cpu']}",
              "recipes": {}}
    recipes = sorted({p.stem.removeprefix("train-").rsplit("-", 1)[0] for p in archive.glob("train-*.json")})
    for recipe in recipes:
        modes = {m: r for m in MODES if (r := decoder_record(archive, recipe, m)) is not None}
        if not modes:
            continue
        if len(modes) == 2:
            gap = result["full"]["average"] - modes["pruned"]["average"]
            modes["closure"] = (modes["overfill"]["average"] - modes["pruned"]["average"]) / gap if gap else None
        result["recipes"][recipe] = modes
    (out / "recipe.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "recipe_table.md").write_text(markdown(result))
    print(markdown(result))


def markdown(result: dict) -> str:
    full = result["full"]
    lines = [f"Full model: average {full['average']:.3f}, chat perplexity {full['chat_perplexity']:.2f} "
             f"({result['machine']}).", "",
             "| recipe | mode | average (7 tasks) | chat ppl | KL(full ‖ decoder) | top-1 agreement | train tok/s | closure |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for recipe, modes in result["recipes"].items():
        for mode in MODES:
            if mode not in modes:
                continue
            r, c = modes[mode], modes[mode]["chat"]
            closure = modes.get("closure") if mode == "overfill" else None
            lines.append(f"| {recipe} | {mode} | {r['average']:.3f} | {c['perplexity']:.1f} | "
                         f"{c.get('kl_from_full', float('nan')):.3f} | {c['top1_agreement']:.3f} | "
                         f"{r['train']['tokens_per_s']:.0f} | {'' if closure is None else f'{closure:.2f}'} |")
    lines += ["", "Greedy answers (48 tokens):", ""]
    for prompt in [*(full["answers"] or {})]:
        lines.append(f"- **{prompt}** full: {full['answers'][prompt]!r}")
        for recipe, modes in result["recipes"].items():
            for mode in MODES:
                if "answers" in modes.get(mode, {}):
                    lines.append(f"  - {recipe} / {mode}: {modes[mode]['answers'][prompt]!r}")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("stage", choices=["answers", "collect"])
    ap.add_argument("--run", default="runs/recipes")
    ap.add_argument("--out", default="docs/results")
    args = ap.parse_args()
    if args.stage == "answers":
        answers(Path(args.run))
    else:
        collect(Path(args.run), Path(args.out))


if __name__ == "__main__":
    main()
