"""vLLM against our engine on a real pair: greedy tokens of the exported OverFill pair through vLLM's `LLM`
and through our two-stage engine, fp32, for chat prompts. Run in vLLM's environment:

    .venv-vllm/bin/python benchmarks/vllm/check_pair.py DECODER_DIR [--out benchmarks/vllm/results/NAME.json]
"""
import argparse
import json
import tempfile


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("decoder")
    ap.add_argument("--full", default="smollm2-135m-instruct")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import torch

    from overfill.evaluate import greedy_generations
    from overfill.export import export_vllm
    from overfill.two_stage import TwoStageModel

    dec = args.decoder
    out = str(export_vllm(dec, tempfile.mkdtemp(prefix="check_pair_") + "/pair", args.full))
    pair = TwoStageModel.from_refs(args.full, dec, dtype=torch.float32)
    tok = pair.tokenizer
    prompts = ["What is the capital of France?", "Write a haiku about the sea.", "Explain why the sky is blue.",
               "Give me three tips for a job interview.", "What is 12 times 7?", "hi"]
    ids = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True)
           for p in prompts]
    ids = [list(i["input_ids"]) if hasattr(i, "keys") else list(i) for i in ids]  # transformers 5 returns a dict
    ours = [g for g, _ in greedy_generations(pair, "overfill", ids, args.new_tokens)]
    eos = sorted(pair.eos_token_ids)
    del pair
    from vllm import LLM, SamplingParams

    llm = LLM(model=out, dtype="float32", enforce_eager=True, max_model_len=1024, seed=0)
    res = llm.generate([{"prompt_token_ids": i} for i in ids], SamplingParams(temperature=0, max_tokens=args.new_tokens),
                       use_tqdm=False)
    theirs = [list(r.outputs[0].token_ids) for r in res]
    theirs = [t[:min([t.index(e) for e in eos if e in t] or [len(t)])] for t in theirs]
    same = [a == b for a, b in zip(ours, theirs)]
    first = [next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
             for a, b in zip(ours, theirs)]
    result = {"full": args.full, "decoder": dec, "dtype": "float32", "prompts": prompts, "identical": same,
              "first_difference": first, "ours_len": [len(a) for a in ours], "vllm_len": [len(b) for b in theirs],
              "ours_text": [tok.decode(a) for a in ours], "vllm_text": [tok.decode(b) for b in theirs]}
    print(json.dumps(result, indent=2))
    if args.out:
        open(args.out, "w").write(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
