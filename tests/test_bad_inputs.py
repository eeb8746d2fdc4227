"""Bad input, table-driven: whatever a careless or hostile user passes to a command.

The rule of every case: exit code 2 and one line `overfill CMD: error: ...` that names what is
wrong (the `expect` words), no traceback, and no byte of any input changed. The server's bad
requests are in test_serve_reliability.py (`test_malformed_requests_get_4xx_openai_errors` and
the tests after it); damaged training state, which must resume rather than fail, is at the end.
"""
import hashlib
import json
import shutil
from pathlib import Path

import pytest

from overfill.cli import main
from conftest import chat, save_tiny, validation_ids, write_jsonl

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    records = [chat(i, 4 + i % 5) for i in range(24)] + [chat(i, 5) for i in validation_ids(3)]
    return {"root": root, "full": save_tiny(root / "full", seed=0),
            "decoder": save_tiny(root / "decoder", seed=1, hidden_size=32, intermediate_size=48),
            "data": write_jsonl(root / "chats.jsonl", records)}


def tree_digest(paths) -> dict:
    """Every file's bytes under `paths`: the inputs must come out of a failed command unchanged."""
    digest = {}
    for top in paths:
        for path in sorted(Path(top).rglob("*")) if Path(top).is_dir() else [Path(top)]:
            if path.is_file():
                digest[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digest


# ---------------------------------------------------------------------------- damaged inputs, made in tmp

def model_copy(world, tmp, edit_config=None, weights: bytes | None = None, name="model") -> Path:
    path = tmp / name
    shutil.copytree(world["full"], path)
    if edit_config is not None:
        config = json.loads((path / "config.json").read_text())
        result = edit_config(config)
        (path / "config.json").write_text(json.dumps(config if result is None else result))
    if weights is not None:
        (path / "model.safetensors").write_bytes(weights)
    return path


def config_set(**values):
    return lambda c: c.update(values)


def config_drop(key):
    def drop(config):
        del config[key]
    return drop


def truncated_weights(world) -> bytes:
    data = (world["full"] / "model.safetensors").read_bytes()
    return data[: len(data) // 2]


def data_file(tmp, content: bytes, name="data.jsonl") -> Path:
    (tmp / name).write_bytes(content)
    return tmp / name


CHATS = "".join(json.dumps(chat(i)) + "\n" for i in range(24)).encode()


def chats_with(message: str) -> bytes:
    """Valid chats plus one whose user message is `message` (raw JSON text, escapes allowed)."""
    bad = ('{"id": "bad", "messages": [{"role": "user", "content": "%s"}, '
           '{"role": "assistant", "content": "w1 w2"}]}\n' % message)
    return CHATS + bad.encode()


def train_argv(world, tmp, *extra, data=None, out=None):
    return ["train", "--full", str(world["full"]), "--decoder", str(world["decoder"]), "--data",
            str(data or world["data"]), "--out", str(out or tmp / "run"), "--steps", "2", "--batch-size", "4",
            "--max-len", "64", "--eval-every", "0", "--checkpoint-every", "0", "--precision", "fp32", *extra]


def generate_argv(full, *extra):
    return ["generate", "--full", str(full), "--max-new-tokens", "2", *extra, "w1 w2"]


def a_file(tmp, name="file.txt") -> Path:
    (tmp / name).write_text("not a directory\n")
    return tmp / name


def a_run_dir_without_run(tmp) -> Path:
    (tmp / "notes").mkdir()
    (tmp / "notes" / "todo.txt").write_text("mine\n")
    return tmp / "notes"


def with_env(env, argv):
    """A case run with environment variables set: env(world, tmp) -> {name: value}."""
    def case(world, tmp):
        return argv(world, tmp)
    case.env = env
    return case


def prune_argv(model, out, *extra, calibration=None, w=None):
    """A prune that runs in a second on the tiny model (calibration on the chats file)."""
    return ["prune", str(model), "--hidden", "0.5", "--calibration", str(calibration or w["data"]), "--samples", "4",
            "--loss-samples", "2", "--seq-len", "16", "--out", str(out), *extra]


def eval_argv(w, full, out, chat_source=None):
    return ["eval", "--full", str(full), "--tasks", "none", "--chat-examples", "2", "--chat-source",
            str(chat_source or w["data"]), "--out", str(out)]


def data_copy(w, tmp, name="chats.jsonl") -> Path:
    (tmp / "data").mkdir(exist_ok=True)
    return Path(shutil.copy(w["data"], tmp / "data" / name))


def results_copy(tmp) -> Path:
    """A results file of `overfill eval`, as the repository keeps them."""
    return Path(shutil.copy(REPO / "docs" / "results" / "quality_evals" / "full.json", tmp / "full.json"))


def alias_bomb(tmp, levels=4) -> Path:
    """A YAML of nested aliases: small, but 9**levels items once expanded."""
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels + 1)]
    return _text_file(tmp, "bomb.yaml", "\n".join(lines) + f"\nsteps: *a{levels}\n")


def deep_json(depth=100_000) -> str:
    return "[" * depth + "]" * depth


def pair_trained_with(w, tmp) -> Path:
    """An OverFill directory whose overfill.json records the world's full model and its fingerprint."""
    from overfill.model import weights_fingerprint

    decoder = _decoder_copy(w, tmp)
    (decoder / "overfill.json").write_text(json.dumps({"full": str(w["full"]),
                                                       "full_weights_sha256": weights_fingerprint(w["full"])}))
    return decoder


def weights_outside(w, tmp, link=False) -> Path:
    """A model directory whose weights are elsewhere: named by its index, or linked."""
    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(w["full"] / "model.safetensors", elsewhere / "model.safetensors")
    model = _without_weights(w, tmp)
    if link:
        (model / "model.safetensors").symlink_to(elsewhere / "model.safetensors")
        return model
    from safetensors import safe_open

    with safe_open(str(elsewhere / "model.safetensors"), "pt") as f:
        weight_map = {key: "../elsewhere/model.safetensors" for key in f.keys()}
    (model / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return model


# Each case: (id, argv from (world, tmp), words the error must contain). A case made `with_env` runs
# with those environment variables.
CASES = [
    # --- model directories
    ("model-missing", lambda w, t: ["info", str(t / "nowhere")], ["nowhere"]),
    ("model-no-config", lambda w, t: ["info", str(t)], ["config.json"]),
    ("config-not-json", lambda w, t: ["info", str(_with_file(model_copy(w, t), "config.json", "{"))],
     ["config.json"]),
    ("config-a-list", lambda w, t: ["info", str(model_copy(w, t, lambda c: []))], ["config.json", "object"]),
    ("config-no-heads", lambda w, t: ["info", str(model_copy(w, t, config_drop("num_attention_heads")))],
     ["num_attention_heads"]),
    ("config-width-a-string", lambda w, t: ["info", str(model_copy(w, t, config_set(hidden_size="64")))],
     ["hidden_size", "integer"]),
    ("config-negative-layers", lambda w, t: ["info", str(model_copy(w, t, config_set(num_hidden_layers=-1)))],
     ["num_hidden_layers"]),
    ("config-zero-vocab", lambda w, t: ["info", str(model_copy(w, t, config_set(vocab_size=0)))], ["vocab_size"]),
    ("config-heads-not-a-multiple-of-kv", lambda w, t: ["info", str(model_copy(w, t, config_set(
        num_key_value_heads=3)))], ["num_key_value_heads"]),
    ("config-unsupported-type", lambda w, t: ["info", str(model_copy(w, t, config_set(model_type="gpt2")))],
     ["gpt2", "supported"]),
    ("config-fewer-layers-than-weights", lambda w, t: generate_argv(model_copy(w, t, config_set(
        num_hidden_layers=1))), ["layers.1", "config"]),
    ("config-more-layers-than-weights", lambda w, t: generate_argv(model_copy(w, t, config_set(
        num_hidden_layers=3))), ["lack"]),
    ("config-wrong-width", lambda w, t: generate_argv(model_copy(w, t, config_set(intermediate_size=80))),
     ["do not match"]),
    ("weights-truncated", lambda w, t: generate_argv(model_copy(w, t, weights=truncated_weights(w))),
     ["model.safetensors"]),
    ("weights-garbage", lambda w, t: generate_argv(model_copy(w, t, weights=b"\x00garbage" * 100)),
     ["model.safetensors"]),
    ("weights-missing", lambda w, t: generate_argv(_without_weights(w, t)), ["safetensors"]),
    ("generation-config-malformed", lambda w, t: generate_argv(_with_file(model_copy(w, t), "generation_config.json",
                                                                          "{oops")), ["generation_config.json"]),
    ("overfill-json-malformed", lambda w, t: ["generate", "--full", str(w["full"]), "--decoder",
                                              str(_with_file(_decoder_copy(w, t), "overfill.json", "[1, 2")), "w1"],
     ["overfill.json"]),
    ("overfill-json-unknown-field", lambda w, t: ["generate", "--full", str(w["full"]), "--decoder",
                                                  str(_with_file(_decoder_copy(w, t), "overfill.json",
                                                                 '{"refresh": 3}')), "w1"], ["overfill.json"]),
    ("overfill-json-full-empty", lambda w, t: ["generate", "--full", str(w["full"]), "--decoder",
                                               str(_with_file(_decoder_copy(w, t), "overfill.json", '{"full": ""}')),
                                               "w1"], ["overfill.json", "full"]),
    ("pair-other-head-size", lambda w, t: generate_argv(w["full"], "--decoder", str(_tiny(t, head_dim=8))),
     ["head"]),
    ("pair-other-vocabulary", lambda w, t: ["generate", "--full", str(w["full"]), "--decoder",
                                            str(_tiny(t, vocab_size=96)), "w1"], ["vocab"]),
    # --- data files
    ("data-missing", lambda w, t: train_argv(w, t, data=t / "none.jsonl"), ["none.jsonl"]),
    ("data-binary", lambda w, t: train_argv(w, t, data=data_file(t, bytes(range(256)) * 64)), ["utf-8"]),
    ("data-latin-1", lambda w, t: train_argv(w, t, data=data_file(t, CHATS + '{"id": "é"}\n'.encode("latin-1"))),
     ["utf-8"]),
    ("data-empty", lambda w, t: train_argv(w, t, data=data_file(t, b"")), ["no"]),
    ("data-not-json", lambda w, t: train_argv(w, t, data=data_file(t, CHATS + b"{not json\n")), ["line 25"]),
    ("data-lone-surrogate", lambda w, t: train_argv(w, t, data=data_file(t, chats_with("\\ud800"))),
     ["line 25", "surrogate"]),
    ("data-record-without-messages", lambda w, t: train_argv(w, t, data=data_file(t, CHATS + b'{"id": "x"}\n')),
     ["messages"]),
    ("data-messages-not-a-list", lambda w, t: train_argv(w, t, data=data_file(
        t, CHATS + b'{"id": "x", "messages": "hi"}\n')), ["messages"]),
    ("data-nothing-fits", lambda w, t: train_argv(w, t, "--max-len", "4"), ["max-len"]),
    # --- training flags and directories
    ("kd-weight-nan", lambda w, t: train_argv(w, t, "--kd-weight", "nan"), ["kd-weight"]),
    ("lr-negative", lambda w, t: train_argv(w, t, "--lr", "-1"), ["lr"]),
    ("batch-size-zero", lambda w, t: train_argv(w, t, "--batch-size", "0"), ["batch-size"]),
    ("batch-size-beyond-the-data", lambda w, t: train_argv(w, t, "--batch-size", str(10**20)), ["batch-size"]),
    ("steps-and-tokens", lambda w, t: train_argv(w, t, "--tokens", "1000"), ["--steps", "--tokens"]),
    ("out-is-the-full-model", lambda w, t: train_argv(w, t, out=w["full"]), ["--full"]),
    ("out-inside-the-decoder", lambda w, t: train_argv(w, t, "--resume", out=w["decoder"] / "run"), ["--decoder"]),
    ("resume-into-a-dir-without-a-run", lambda w, t: train_argv(w, t, "--resume", out=a_run_dir_without_run(t)),
     ["holds no training run"]),
    ("train-out-is-a-file", lambda w, t: train_argv(w, t, out=a_file(t)), ["file.txt"]),
    ("train-out-under-a-file", lambda w, t: train_argv(w, t, out=a_file(t) / "run"), ["file.txt"]),
    # --- eval / bench / prune / generate flags, checked before any work
    ("eval-out-is-a-dir", lambda w, t: ["eval", "--full", str(w["full"]), "--tasks", "none", "--chat-examples",
                                        "2", "--chat-source", str(w["data"]), "--out", str(t)], ["--out"]),
    ("eval-out-under-a-file", lambda w, t: ["eval", "--full", str(w["full"]), "--tasks", "none",
                                            "--chat-examples", "2", "--chat-source", str(w["data"]), "--out",
                                            str(a_file(t) / "r.json")], ["file.txt"]),
    ("eval-unknown-task", lambda w, t: ["eval", "--full", str(w["full"]), "--tasks", "arc_hard"], ["arc_hard"]),
    ("eval-negative-limit", lambda w, t: ["eval", "--full", str(w["full"]), "--limit", "-3"], ["limit"]),
    ("bench-out-is-a-dir", lambda w, t: ["bench", "--full", str(w["full"]), "--out", str(t)], ["--out"]),
    ("generate-negative-tokens", lambda w, t: generate_argv(w["full"], "--max-new-tokens", "-1"),
     ["max-new-tokens"]),
    ("generate-negative-temperature", lambda w, t: generate_argv(w["full"], "--temperature", "-1"),
     ["temperature"]),
    ("generate-top-p-above-one", lambda w, t: generate_argv(w["full"], "--top-p", "2"), ["top-p"]),
    ("build-out-is-the-full-model", lambda w, t: ["build", "--full", str(w["full"]), "--data", str(w["data"]),
                                                  "--out", str(w["full"])], ["--full"]),
    ("build-out-holds-something-else", lambda w, t: ["build", "--full", str(w["full"]), "--data", str(w["data"]),
                                                     "--out", str(a_run_dir_without_run(t))], ["holds no build"]),
    ("build-steps-and-tokens", lambda w, t: ["build", "--full", str(w["full"]), "--data", str(w["data"]), "--steps",
                                             "2", "--tokens", "100", "--out", str(t / "b")], ["--steps", "--tokens"]),
    ("prune-ratio-above-one", lambda w, t: ["prune", str(w["full"]), "--hidden", "1.5", "--out", str(t / "p")],
     ["--hidden"]),
    ("prune-out-is-the-model", lambda w, t: ["prune", str(w["full"]), "--hidden", "0.5", "--out", str(w["full"])],
     ["--out"]),
    ("prune-calibration-binary", lambda w, t: ["prune", str(w["full"]), "--hidden", "0.5", "--calibration",
                                               str(data_file(t, bytes(range(256)) * 64)), "--out", str(t / "p")],
     ["utf-8"]),
    # --- outputs that are, hold or lie inside an input (issue 30, item 2)
    ("prune-overwrite-out-holds-the-model", lambda w, t: prune_argv(model_copy(w, t), t, "--overwrite", w=w),
     ["--out", "holds", "MODEL"]),
    ("prune-overwrite-out-is-the-model", lambda w, t: prune_argv(model_copy(w, t), t / "model", "--overwrite", w=w),
     ["--out", "MODEL"]),
    ("prune-out-inside-the-model", lambda w, t: prune_argv(model_copy(w, t), t / "model" / "pruned", w=w),
     ["--out", "inside", "MODEL"]),
    ("prune-overwrite-a-dir-prune-did-not-write", lambda w, t: prune_argv(
        w["full"], a_run_dir_without_run(t), "--overwrite", w=w), ["--overwrite", "prune output", "todo.txt"]),
    ("prune-overwrite-out-holds-the-calibration", lambda w, t: prune_argv(
        w["full"], t / "data", "--overwrite", calibration=data_copy(w, t)), ["--out", "--calibration"]),
    ("eval-out-is-a-file-of-the-full-model", lambda w, t: eval_argv(w, model_copy(w, t), t / "model" / "config.json"),
     ["--out", "--full"]),
    ("eval-out-is-the-chat-source", lambda w, t: eval_argv(w, w["full"], data_copy(w, t), data_copy(w, t)),
     ["--out", "--chat-source"]),
    ("eval-report-out-is-its-input", lambda w, t: ["eval", "--report", str(results_copy(t)), "--out",
                                                   str(t / "full.json")], ["--out", "--report"]),
    ("bench-out-is-a-file-of-the-full-model", lambda w, t: [
        "bench", "--full", str(model_copy(w, t)), "--out", str(t / "model" / "config.json"), "--prompt-len", "4",
        "--output-len", "2", "--repeats", "1", "--warmup", "0", "--systems", "overfill", "--refresh-every", "0", "--no-plots"],
     ["--out", "--full"]),
    # --- training settings that cannot train (item 3)
    ("lr-infinite", lambda w, t: train_argv(w, t, "--lr", "inf"), ["lr", "finite"]),
    ("kd-weight-infinite", lambda w, t: train_argv(w, t, "--kd-weight", "inf"), ["kd-weight", "finite"]),
    ("weight-decay-infinite", lambda w, t: train_argv(w, t, "--weight-decay", "inf"), ["weight-decay", "finite"]),
    ("tokens-zero", lambda w, t: train_argv(w, t, "--steps", "null", "--tokens", "0"), ["tokens", "positive"]),
    ("steps-zero", lambda w, t: train_argv(w, t, "--steps", "0"), ["steps", "positive"]),
    ("steps-beyond-any-plan", lambda w, t: train_argv(w, t, "--steps", str(10**20)), ["--steps", "plan"]),
    ("lr-that-diverges", lambda w, t: train_argv(w, t, "--lr", "1e30", "--steps", "4"), ["diverged", "no model"]),
    # --- recorded references (item 4)
    ("pair-full-model-not-the-trained-one", lambda w, t: generate_argv(_tiny(t, seed=3, hidden_size=64,
                                                                             intermediate_size=96),
                                                                       "--decoder", str(pair_trained_with(w, t))),
     ["trained with", "sha-256"]),
    ("export-full-model-not-the-trained-one", lambda w, t: [
        "export", str(pair_trained_with(w, t)), "--full", str(_tiny(t, seed=3, hidden_size=64, intermediate_size=96)),
        "--out", str(t / "ex")], ["trained with"]),
    # --- places that cannot be written (item 6)
    ("cache-is-a-file", with_env(lambda w, t: {"OVERFILL_CACHE": str(a_file(t))},
                                 lambda w, t: ["info", "smollm2-135m-instruct"]), ["OVERFILL_CACHE", "file.txt"]),
    # --- input that an error must not repeat whole, or that crashed the reader (item 7)
    ("config-alias-bomb", lambda w, t: train_argv(w, t, "--config", str(alias_bomb(t))), ["--config", "alias"]),
    ("config-not-utf-8", lambda w, t: train_argv(w, t, "--config", str(data_file(t, b"steps: 2\nlr: \xff\xfe\n",
                                                                             "c.yaml"))), ["--config", "utf-8"]),
    ("generate-top-k-beyond-int64", lambda w, t: generate_argv(w["full"], "--temperature", "1", "--top-k",
                                                                str(2**64)), ["top-k"]),
    ("data-nested-too-deeply", lambda w, t: train_argv(w, t, data=data_file(t, CHATS + deep_json().encode())),
     ["line 25", "nested"]),
    ("config-nested-too-deeply", lambda w, t: ["info", str(_with_file(model_copy(w, t), "config.json", deep_json()))],
     ["config.json", "nested"]),
    ("prune-out-under-a-file", lambda w, t: ["prune", str(w["full"]), "--hidden", "0.5", "--out",
                                             str(a_file(t) / "p")], ["file.txt"]),
    # --- security (item 8)
    ("serve-api-key-empty", lambda w, t: ["serve", "--full", str(w["full"]), "--api-key", "", "--port", "70000"],
     ["--api-key", "empty"]),  # the bad port: a server that took the empty key fails rather than serves
    ("serve-api-key-variable-empty", with_env(lambda w, t: {"OVERFILL_API_KEY": ""}, lambda w, t: [
        "serve", "--full", str(w["full"]), "--port", "70000"]), ["OVERFILL_API_KEY", "empty"]),
    ("weights-index-names-a-file-outside", lambda w, t: generate_argv(weights_outside(w, t)), ["outside"]),
    ("weights-linked-from-outside", lambda w, t: generate_argv(weights_outside(w, t, link=True)), ["outside"]),
    # --- found probing further: input a message repeated whole, paths the file system refuses
    ("model-path-too-long", lambda w, t: ["info", "m" * 5000], ["too long"]),
    ("device-name-huge", lambda w, t: generate_argv(w["full"], "--device", "d" * 100_000), ["bad device"]),
    ("task-name-huge", lambda w, t: ["eval", "--full", str(w["full"]), "--tasks", "t" * 100_000], ["unknown task"]),
    ("data-path-too-long", lambda w, t: train_argv(w, t, data=t / ("d" * 5000)), ["too long"]),
    # --- small ones (item 9)
    ("one-row-kernel-switch-misspelt", with_env(lambda w, t: {"OVERFILL_ONE_ROW_KERNEL": "flase"},
                                                lambda w, t: generate_argv(w["full"], "--precision", "bf16",
                                                                           "--device", "cpu")),
     ["OVERFILL_ONE_ROW_KERNEL"]),
]


def _without_weights(world, tmp) -> Path:
    path = model_copy(world, tmp)
    (path / "model.safetensors").unlink()
    return path


def _with_file(path: Path, name: str, text: str) -> Path:
    (path / name).write_text(text)
    return path


def _decoder_copy(world, tmp) -> Path:
    path = tmp / "decoder"
    shutil.copytree(world["decoder"], path)
    return path


def _text_file(tmp, name: str, text: str) -> Path:
    (tmp / name).write_text(text)
    return tmp / name


def _tiny(tmp, seed=2, **overrides) -> Path:
    return save_tiny(tmp / "other", seed=seed, **({"hidden_size": 32, "intermediate_size": 48} | overrides))


def _exit_code(args: list[str]) -> int:
    """What `overfill ARGS` exits with: main's return value, or the parser's exit on a bad flag."""
    try:
        return main(args)
    except SystemExit as e:
        return e.code


LONGEST_MESSAGE = 2000
"""An error repeats at most ECHO_LIMIT characters of any one input: its line stays short."""


def test_the_suite_is_wide():
    assert len(CASES) >= 89
    assert len({case[0] for case in CASES}) == len(CASES)


@pytest.mark.parametrize("name,argv,expect", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_one_line_and_exit_code_2(world, tmp_path, capsys, monkeypatch, name, argv, expect):
    inputs = [world["full"], world["decoder"], world["data"]]
    before = tree_digest(inputs)
    args = argv(world, tmp_path)
    for variable, value in getattr(argv, "env", lambda w, t: {})(world, tmp_path).items():
        monkeypatch.setenv(variable, value)
    made = tree_digest([tmp_path])  # the damaged copies this case made, which are inputs too
    code = _exit_code(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err[-3:]
    message = [line for line in err if line.startswith(f"overfill {args[0]}: error: ")]
    assert len(message) == 1, err[-3:]
    assert len(message[0]) < LONGEST_MESSAGE, message[0][:LONGEST_MESSAGE]
    assert "Traceback" not in "\n".join(err)
    said = message[0].lower().replace("_", "-")  # settings may be named as fields or as flags
    for word in expect:
        assert word.lower().replace("_", "-") in said, (word, message[0])
    assert tree_digest(inputs) == before
    assert {k: v for k, v in tree_digest([tmp_path]).items() if k in made} == made


# ---------------------------------------------------------------------------- damaged training state: resume

def _run(world, out, **overrides):
    from overfill.train import TrainConfig

    base = dict(full=str(world["full"]), decoder=str(world["decoder"]), data=str(world["data"]), out=str(out),
                steps=6, batch_size=4, lr=3e-3, warmup=1, max_len=64, checkpoint_every=2, keep=2, eval_every=0,
                precision="fp32")
    return TrainConfig(**(base | overrides))


def _run_argv(world, out) -> list[str]:
    """`_run`'s settings as an `overfill train` command line."""
    return ["train", "--full", str(world["full"]), "--decoder", str(world["decoder"]), "--data", str(world["data"]),
            "--out", str(out), "--steps", "6", "--batch-size", "4", "--lr", "3e-3", "--warmup", "1", "--max-len", "64",
            "--checkpoint-every", "2", "--keep", "2", "--eval-every", "0", "--precision", "fp32"]


def _killed_after_step(world, out, step: int):
    """A finished 6-step run cut back to what a kill right after `step`'s checkpoint leaves."""
    from overfill.train import train

    train(_run(world, out))
    for name in ("model.safetensors", "summary.json"):
        (out / name).unlink()
    lines = (out / "metrics.jsonl").read_text().splitlines(keepends=True)
    (out / "metrics.jsonl").write_text("".join(lines[:step]))
    for checkpoint in (out / "checkpoints").iterdir():
        if int(checkpoint.name.split("-")[1]) > step:
            shutil.rmtree(checkpoint)


def _losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference_run(world, tmp_path_factory):
    from overfill.train import train

    return train(_run(world, tmp_path_factory.mktemp("reference") / "run"))


def test_resume_drops_a_partial_last_metrics_line(world, reference_run, tmp_path, capsys):
    from overfill.train import train

    out = tmp_path / "run"
    _killed_after_step(world, out, 4)
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "loss": 3.1')  # killed mid-line
    train(_run(world, out, resume=True))
    assert "dropped 1 unreadable line" in capsys.readouterr().out
    assert _losses(out) == pytest.approx(_losses(reference_run), abs=1e-6)


@pytest.mark.parametrize("damage", ["weights-truncated", "state-missing", "optimizer-garbage"])
def test_resume_falls_back_past_a_damaged_newest_checkpoint(world, reference_run, tmp_path, capsys, damage):
    from overfill.train import train

    out = tmp_path / "run"
    _killed_after_step(world, out, 4)
    newest = out / "checkpoints" / "step-00000004"
    if damage == "weights-truncated":
        weights = next(newest.glob("model*.safetensors"))
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "state-missing":
        (newest / "trainer_state.json").unlink()
    else:
        optimizer = next(newest.glob("optimizer*"))
        optimizer.write_bytes(b"garbage")
    train(_run(world, out, resume=True))
    said = capsys.readouterr().out
    assert "step-00000004 does not load" in said and "resuming from" in said and "step-00000002" in said
    assert (out / "checkpoints" / "damaged-step-00000004").is_dir()  # kept for a look, not deleted
    assert _losses(out) == pytest.approx(_losses(reference_run), abs=1e-6)  # steps 3-6 redone, same curve


def test_a_full_disk_during_a_checkpoint_is_one_line_and_the_run_resumes(world, reference_run, tmp_path,
                                                                          monkeypatch, capsys):
    import errno

    from accelerate import Accelerator

    save_state = Accelerator.save_state

    def disk_full_at_step_4(self, output_dir, **kwargs):
        if "step-00000004" in output_dir:
            raise OSError(errno.ENOSPC, "No space left on device", output_dir)
        return save_state(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", disk_full_at_step_4)
    out = tmp_path / "run"
    argv = _run_argv(world, out)
    assert main(argv) == 2
    error = [line for line in capsys.readouterr().err.splitlines() if line.startswith("overfill train: error:")]
    assert len(error) == 1 and "No space left on device" in error[0] and "step-00000002" in error[0]
    monkeypatch.undo()
    assert main(argv + ["--resume"]) == 0
    assert _losses(out) == pytest.approx(_losses(reference_run), abs=1e-6)


def test_resume_with_no_loadable_checkpoint_is_one_line(world, tmp_path, capsys):
    out = tmp_path / "run"
    _killed_after_step(world, out, 4)
    for checkpoint in (out / "checkpoints").iterdir():
        (checkpoint / "trainer_state.json").write_text("{")
    argv = _run_argv(world, out) + ["--resume"]
    assert main(argv) == 2
    assert "no checkpoint in" in capsys.readouterr().err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["damaged-step-00000002", "damaged-step-00000004"]


# ---------------------------------------------------------------------------- a run that diverges or cannot write

def _errors(capsys, command="train") -> list[str]:
    said = capsys.readouterr().err
    assert "Traceback" not in said
    return [line for line in said.splitlines() if line.startswith(f"overfill {command}: error:")]


def test_a_diverging_run_stops_keeps_its_last_good_checkpoint_and_writes_no_model(world, tmp_path, monkeypatch,
                                                                                 capsys):
    import overfill.train

    losses, calls = overfill.train.response_losses, []

    def nan_from_step_3(*args, **kwargs):  # what an exploding update leads to, two steps after a checkpoint
        calls.append(1)
        ce, kl = losses(*args, **kwargs)
        return (ce * float("nan"), kl) if len(calls) > 2 else (ce, kl)

    monkeypatch.setattr(overfill.train, "response_losses", nan_from_step_3)
    out = tmp_path / "run"
    assert main(_run_argv(world, out)) == 2  # 6 steps, a checkpoint every 2
    error = _errors(capsys)
    assert len(error) == 1 and "diverged at step 3" in error[0] and "step-00000002" in error[0]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000002"]
    assert not (out / "model.safetensors").exists() and not (out / "summary.json").exists()
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def _strict_json(text: str):
    """JSON as the standard defines it: no NaN or Infinity (Python's json reads them)."""
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    return json.loads(text, parse_constant=refuse)


def test_the_summary_and_metrics_are_valid_json_with_a_nan_validation_loss(world, tmp_path, monkeypatch):
    from overfill.train import Trainer, train

    monkeypatch.setattr(Trainer, "validate", lambda self: {"val_loss": float("nan")})  # e.g. no response token to score
    out = train(_run(world, tmp_path / "run", steps=2, eval_every=1, checkpoint_every=0))
    assert _strict_json((out / "summary.json").read_text())["final_val_loss"] is None
    assert all(_strict_json(line) for line in (out / "metrics.jsonl").read_text().splitlines())


def _full_disk(writer: str):
    """(module, function, the error it raises on a full disk): safetensors' Rust error names the OS error,
    torch.save's zip writer only says it could not write."""
    import safetensors.torch
    import torch
    from safetensors import SafetensorError

    if writer == "safetensors":
        return safetensors.torch, "save_file", SafetensorError(
            "Error while serializing: I/O error: No space left on device (os error 28)")
    return torch, "save", RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 72384 vs 72276")


@pytest.mark.parametrize("writer", ["safetensors", "torch.save"])
def test_a_full_disk_as_each_writer_reports_it_is_the_resume_message(world, tmp_path, monkeypatch, capsys, writer):
    module, function, error = _full_disk(writer)

    def disk_full(*args, **kwargs):
        raise error

    monkeypatch.setattr(module, function, disk_full)
    out = tmp_path / "run"
    assert main(_run_argv(world, out)) == 2
    said = _errors(capsys)
    assert len(said) == 1 and "make room, then rerun with --resume" in said[0]
    monkeypatch.undo()
    assert main(_run_argv(world, out) + ["--resume"]) == 0


def test_a_tied_decoder_checkpoints_without_accelerates_note_on_shared_tensors(tmp_path, caplog):
    from overfill.train import train

    full = save_tiny(tmp_path / "full", seed=0, tie_word_embeddings=True)
    decoder = save_tiny(tmp_path / "decoder", seed=1, hidden_size=32, intermediate_size=48, tie_word_embeddings=True)
    data = write_jsonl(tmp_path / "chats.jsonl", [chat(i) for i in range(8)])
    with caplog.at_level("WARNING"):
        train(_checkpointed_each_step(full, decoder, data, tmp_path / "run"))
    assert (tmp_path / "run" / "checkpoints" / "step-00000001").is_dir()
    assert not [r for r in caplog.records if "Removed shared tensor" in r.getMessage()]


def _checkpointed_each_step(full, decoder, data, out):
    from overfill.train import TrainConfig

    return TrainConfig(full=str(full), decoder=str(decoder), data=str(data), out=str(out), steps=2, batch_size=4,
                       max_len=64, checkpoint_every=1, eval_every=0, precision="fp32")


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory no file can be created in, not even by root: immutable (skipped where chattr cannot)."""
    import subprocess

    path = tmp_path / "read-only"
    path.mkdir()
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode:
        pytest.skip("chattr +i is not available here")
    try:
        yield path
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


@pytest.mark.parametrize("command", ["eval", "bench"])
def test_an_output_that_cannot_be_written_is_refused_before_any_work(world, read_only_dir, monkeypatch, capsys,
                                                                      command):
    import overfill.bench
    import overfill.commands.eval

    worked = []
    work = (overfill.commands.eval, "evaluate") if command == "eval" else (overfill.bench, "load_suite")
    monkeypatch.setattr(*work, lambda *args: worked.append(args))
    argv = [command, "--full", str(world["full"]), "--out", str(read_only_dir / "results.json")]
    assert _exit_code(argv) == 2
    error = _errors(capsys, command)
    assert len(error) == 1 and "cannot be written" in error[0] and not worked
