"""OverFill as an lm-evaluation-harness model, registered as `overfill`.

    python -m overfill.lm_eval_adapter --model overfill \\
        --model_args full=smollm2-135m-instruct,decoder=DIR,mode=overfill --tasks arc_easy

takes lm_eval's own command-line flags; lm-eval 0.4.13 finds models only in its registry and
loads no plugins, so the registration below must be imported first, which this entry point
does. From Python, import this module and call `lm_eval.simple_evaluate(model="overfill", ...)`.

model_args: `full` (model reference), `decoder` (pruned or OverFill directory), `mode`
(full | decoder | overfill; default overfill with a decoder, else full), `batch_size`,
`max_length` (default: the models' context window), `max_gen_toks` (default 256), `device`.

Scoring uses `evaluate.loglikelihoods`; tokenisation, truncation and rolling windows are the
harness's own (TemplateLM and lm_eval.utils), so with decoder == full the scores are those of
the harness's `hf` model.
"""
from __future__ import annotations

import logging
import sys
from collections import defaultdict

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from .errors import OverfillError
from .evaluate import in_mode, loglikelihoods, prefix_token_id, resolve_mode, tok_encode
from .device import pick_device, resolve_precision
from .engine import SamplingParams
from .generate import stream_batch
from .two_stage import TwoStageModel

log = logging.getLogger(__name__)


@register_model("overfill")
class OverfillLM(TemplateLM):
    """The full model, the decoder alone, or OverFill (full prefill + decoder), for the harness."""

    def __init__(self, full: str = "smollm2-135m-instruct", decoder: str | None = None, mode: str | None = None,
                 batch_size: int | str = 16, max_length: int | None = None, max_gen_toks: int = 256,
                 device: str | None = None, precision: str = "auto", **unused):
        super().__init__()
        if unused:
            log.warning("overfill model: ignoring arguments %s", ", ".join(sorted(unused)))
        torch_device = _device(device)
        self.pair = TwoStageModel.from_refs(str(full), None if decoder is None else str(decoder),
                                            dtype=resolve_precision(precision, torch_device).dtype,
                                            device=torch_device)
        self.mode = resolve_mode(mode, self.pair.is_two_stage)
        self.tokenizer = self.pair.tokenizer
        # "auto" (the harness's adaptive batch size) becomes the default: batches are already bounded in tokens
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 16
        self._max_length = int(max_length or self.pair.context_window)
        self._max_gen_toks = int(max_gen_toks)
        self.staged = in_mode(self.pair, self.mode)

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        return prefix_token_id(self.tokenizer)

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def device(self):
        return self.pair.device

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return tok_encode(self.tokenizer, string, add_special_tokens)

    def tok_decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)

    def get_model_info(self) -> dict:
        return {"overfill_mode": self.mode, "full": self.pair.config.full,
                "full_params": self.pair.full.args.num_params(), "decoder_params": self.pair.decoder.args.num_params()}

    # ------------------------------------------------------------------ log-likelihoods

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: ((context, continuation) or None, context ids, continuation ids)."""
        scores = loglikelihoods(self.pair, self.mode, [(ctx, cont) for _, ctx, cont in requests], self.batch_size,
                                window=self.max_length, progress=not disable_tqdm)
        for (strings, _, _), score in zip(requests, scores):
            if strings is not None:
                self.cache_hook.add_partial("loglikelihood", strings, score)
        return scores

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts, in the harness's disjoint windows of `max_length` tokens."""
        windows, owner = [], []
        for i, (text,) in enumerate(request.args for request in requests):
            tokens = self.tok_encode(text)
            for window in get_rolling_token_windows(token_list=tokens, prefix_token=self.prefix_token_id,
                                                    max_seq_len=self.max_length, context_len=1):
                windows.append((None, *make_disjoint_window(window)))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[i] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # ------------------------------------------------------------------ generation

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Generate (as the mode generates) until a stop string, EOS or `max_gen_toks`."""
        by_kwargs: dict[str, list[int]] = defaultdict(list)
        for i, request in enumerate(requests):
            by_kwargs[repr(sorted(request.args[1].items()))].append(i)
        out = [""] * len(requests)
        with tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm, leave=False) as bar:
            for indices in by_kwargs.values():
                for i, text in zip(indices, self._generate([requests[i].args[0] for i in indices],
                                                           requests[indices[0]].args[1])):
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                    bar.update(1)
        return out

    def _generate(self, contexts: list[str], gen_kwargs: dict) -> list[str]:
        kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        until = handle_stop_sequences(kwargs.pop("until", None), eos=self.tok_decode([self.eot_token_id],
                                                                                      skip_special_tokens=False))
        max_new = kwargs.pop("max_gen_toks")
        if max_new >= self.max_length:
            raise OverfillError(f"max_gen_toks {max_new} leaves no room for a prompt in max_length {self.max_length}")
        do_sample, temperature = kwargs.pop("do_sample"), float(kwargs.pop("temperature", 0.0))
        params = SamplingParams(max_new_tokens=max_new, stop=[s for s in until if s],
                                temperature=temperature if do_sample else 0.0,
                                top_k=int(kwargs.pop("top_k", 0) or 0), top_p=float(kwargs.pop("top_p", 1.0) or 1.0),
                                seed=kwargs.pop("seed", None))
        if kwargs:
            log.warning("overfill model: ignoring generation arguments %s", ", ".join(sorted(kwargs)))
        prompts = [self.tok_encode(c)[-(self.max_length - max_new):] for c in contexts]
        texts = [""] * len(prompts)
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            for row, _, state in stream_batch(self.staged, [prompts[i] for i in batch], params):
                if state.done:
                    texts[batch[row]] = postprocess_generated_text(state.text, until, None)
        return texts


def _device(name: str | None):
    """The device asked for; lm_eval's command line asks for cuda by default, which a CPU machine lacks."""
    if name and name.startswith("cuda") and not torch.cuda.is_available():
        log.warning("overfill model: no CUDA device here, running on the CPU")
        name = "cpu"
    return pick_device(name or "auto")


def main() -> None:
    """`lm_eval` with the `overfill` model registered."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv[0] = "lm_eval"
    cli_evaluate()


if __name__ == "__main__":
    main()
