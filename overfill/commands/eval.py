"""`overfill eval`: benchmarks and chat quality of one mode, or a report of several results files."""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from ..evaluate import EvalConfig, evaluate
from ..files import check_not_an_input, check_output_file, write_errors_as_one_line, write_text_atomic
from ..hub import local_path
from ..report import write_report


@dataclass
class EvalArgs(EvalConfig):
    out: str | None = field(default=None, metadata={
        "help": "results JSON (default results.json); with --report the markdown report "
                "(default report.md), its plot written beside it as .png"})
    report: list[str] = field(default_factory=list, metadata={
        "help": "instead of evaluating, write a report from these results files"})


def eval_command(args: EvalArgs) -> None:
    if args.report:
        out = check_output_file(args.out or "report.md")
        for results in args.report:
            check_not_an_input(out, {"--report": results})
        with write_errors_as_one_line(out):
            write_report(args.report, out)
        print(f"wrote {out}" + (f" and {out.with_suffix('.png')}" if out.with_suffix(".png").is_file() else ""))
        return
    out = check_output_file(args.out or "results.json")
    check_not_an_input(out, {"--full": local_path(args.full), "--decoder": local_path(args.decoder),
                             "--chat-source": local_path(args.chat_source)})
    record = evaluate(args)
    with write_errors_as_one_line(out):
        write_text_atomic(out, json.dumps(record, indent=2))
    print(summary(record))
    print(f"wrote {out} ({record['timings']['total_s']:.0f} s)")


def summary(record: dict) -> str:
    """The average accuracy and the chat measures of a results record, as lines of text."""
    lines = []
    if record["average"]:
        lines.append(f"average acc over {record['average']['tasks']} tasks: {record['average']['acc']:.4f}")
    if record["chat"]:
        c = record["chat"]
        lines.append(f"chat: ppl {c['perplexity']:.3f}  top-1 agreement {c['top1_agreement']:.3f}  "
                     f"KL {c['kl_from_full']:.4f}  greedy match {c['greedy_matching_tokens']:.1f} tokens")
    return "\n".join(lines)
