"""Evaluation: validation loss against a plain loop, the built-in last-word task, local and lm-eval task files
scored through lm-eval against plain forward passes, and the errors that must come before any model is loaded."""

from __future__ import annotations

import json
import math
import shutil
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config

from secateurs import evaluate
from secateurs.checkpoint import CheckpointError, check_checkpoint_dir, load_model, load_tokenizer
from secateurs.config import DataConfig, EvaluateConfig
from secateurs.data import DataError, load_packed, prepare_data

# Three multiple-choice items with their own field names, to exercise the field mapping.
MC_ITEMS = [
    {
        "question": "The capital of France is",
        "options": ["Paris", "Berlin", "a small red bicycle"],
        "label": 0,
    },
    {"question": "Two plus two equals", "options": ["five", "four"], "label": 1},
    {
        "question": "Water freezes at zero degrees",
        "options": ["Celsius", "Fahrenheit", "Kelvin", "Rankine"],
        "label": 0,
    },
]


@pytest.fixture(scope="module")
def eval_data(tmp_path_factory, tokenizer_dir, docs_dir):
    """A dataset whose validation split holds prose: python-docs modules are mostly docstrings; keep 90 of 100
    sequences for validation."""
    out = tmp_path_factory.mktemp("eval-data") / "packed"
    prepare_data(tokenizer_dir, out, DataConfig(source=str(docs_dir), seq_len=128, max_tokens=128 * 100, val_fraction=0.9))
    return out


@pytest.fixture(scope="module")
def unloadable_model(tmp_path_factory, tiny_models):
    """A checkpoint that passes the cheap file checks but fails to load: one weight's shape is transposed in the
    safetensors header. An error raised with it proves that the model was never loaded."""
    path = tmp_path_factory.mktemp("unloadable") / "model"
    shutil.copytree(tiny_models["llama-tied"], path)
    weights = path / "model.safetensors"
    raw = weights.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    entry = header["model.layers.0.mlp.down_proj.weight"]
    entry["shape"] = entry["shape"][::-1]
    new = json.dumps(header, separators=(",", ":")).encode().ljust(n, b" ")
    assert len(new) == n
    weights.write_bytes(raw[:8] + new + raw[8 + n :])
    check_checkpoint_dir(path)
    with pytest.raises(CheckpointError):
        load_model(path)
    return path


def mc_task_files(tmp_path):
    """The same items as a secateurs task file and as an lm-eval task file."""
    jsonl = tmp_path / "items.jsonl"
    jsonl.write_text("".join(json.dumps(item) + "\n" for item in MC_ITEMS))
    ours = tmp_path / "facts.yaml"
    ours.write_text(
        "name: facts\ntype: multiple_choice\njsonl: items.jsonl\n"
        "context_field: question\nchoices_field: options\nanswer_field: label\n"
    )
    lm_eval_dir = tmp_path / "lm_eval_tasks"
    lm_eval_dir.mkdir()
    theirs = lm_eval_dir / "facts_lm_eval.yaml"
    theirs.write_text(
        "task: facts_lm_eval\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {jsonl}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\ndoc_to_choice: options\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    return ours, theirs


def direct_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """sum log p(continuation tokens | everything before), from one plain forward pass."""
    context_ids = tokenizer(context)["input_ids"]
    whole = tokenizer(context + continuation)["input_ids"]
    logprobs = torch.log_softmax(model(input_ids=torch.tensor([whole])).logits[0].float(), dim=-1)
    return sum(logprobs[i - 1, whole[i]].item() for i in range(len(context_ids), len(whole)))


def reference_scores(model, tokenizer, pairs: list[tuple[str, str]]) -> list[tuple[float, bool]]:
    """The plain computation lm-eval must reproduce, per (context, continuation): one unpadded forward pass over
    the tokens of context + continuation, the sum of the log-softmax at the continuation's tokens, and whether
    the argmax is each of them."""
    scores = []
    with torch.no_grad():
        for context, continuation in pairs:
            n = len(tokenizer(context)["input_ids"])
            whole = tokenizer(context + continuation)["input_ids"]
            logits = model(input_ids=torch.tensor([whole])).logits[0, n - 1 : -1].float()
            target = torch.tensor(whole[n:])
            ll = torch.log_softmax(logits, dim=-1).gather(1, target[:, None]).sum().item()
            scores.append((ll, bool((logits.argmax(-1) == target).all())))
    return scores


def test_validation_loss_and_perplexity_match_a_plain_loop(tiny_models, eval_data, tmp_path):
    out = tmp_path / "metrics"
    metrics = evaluate.run(tiny_models["qwen3"], eval_data, out, EvaluateConfig(batch_size=1, max_sequences=5, limit=4))

    model = load_model(tiny_models["qwen3"])
    held_out = load_packed(eval_data)[0]["validation"]
    assert len(held_out) >= 10  # so that the cap of 5 picks every other sequence or sparser, not the first five
    validation = held_out.sequences([i * len(held_out) // 5 for i in range(5)])
    total, count = 0.0, 0
    with torch.no_grad():
        for seq in validation:
            logits = model(input_ids=seq[None]).logits[0]
            total += F.cross_entropy(logits[:-1], seq[1:], reduction="sum").item()
            count += len(seq) - 1
    assert metrics["validation_loss"] == pytest.approx(total / count, abs=1e-6)  # chunked: another summation order
    assert metrics["perplexity"] == math.exp(metrics["validation_loss"])
    assert metrics["validation_tokens"] == count == 5 * 127
    assert metrics["validation_sequences"] == 5
    assert metrics["parameters"] == sum(p.numel() for p in model.parameters())
    assert metrics["tasks"]["lambada-docs"]["n"] == 4
    assert json.loads((out / "metrics.json").read_text()) == metrics == evaluate.read_metrics(out)
    manifest = json.loads((out / "secateurs.json").read_text())
    assert manifest["step"] == "evaluate"
    assert set(manifest["inputs"]) == {"model", "data"}
    assert manifest["report"] == metrics


@pytest.fixture(scope="module")
def llama_128k():
    """A tiny Llama with Llama 3's 128,256-entry vocabulary, untied: at 4 x 128 tokens its fp32 logits (263 MB) are
    hundreds of times its hidden states (131 KB), so the logits decide the peak memory of a validation loss."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama-untied", 128_256), dtype=torch.float32).eval()
    return model, torch.randint(0, 128_256, (4, 128), generator=torch.Generator().manual_seed(1))


def _peak_cpu_bytes(fn) -> int:
    """The most bytes that FN's CPU tensors held at once, from torch's profiler: every allocation and free it
    made, in order, summed."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    assert events, "the profiler recorded no allocation"
    held = peak = 0
    for _, nbytes in events:
        held += nbytes
        peak = max(peak, held)
    return peak


def test_validation_loss_holds_one_chunk_of_logits_at_a_128k_vocabulary(llama_128k):
    """Peak memory of `validation_loss` (beyond the weights, which exist before it) stays within 10% above one
    [chunk_tokens, vocab] fp32 chunk: the hidden states and one layer's activations are the rest. The whole
    batch's fp32 logits are 8 chunks, and plain cross_entropy on them holds about three times that."""
    model, ids = llama_128k
    chunk_tokens, vocab = 64, model.config.vocab_size
    chunk = 4 * chunk_tokens * vocab  # 32.8 MB
    assert 4 * ids.numel() * vocab == 8 * chunk
    peak = _peak_cpu_bytes(lambda: evaluate.validation_loss(model, ids, batch_size=4, chunk_tokens=chunk_tokens))
    assert chunk <= peak <= 1.1 * chunk, (peak, chunk)


def test_validation_loss_equals_full_logits_cross_entropy(llama_128k):
    """Chunked from the hidden states equals cross_entropy over the full fp32 logits (the computation before the
    chunking), to 1e-6 nats; here with a short last batch and chunks that straddle sequences."""
    model, ids = llama_128k
    batch_size, chunk_tokens = 3, 100
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids), batch_size):
            batch = ids[start : start + batch_size]
            logits = model(input_ids=batch, use_cache=False).logits
            total += F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum")
            count += batch[:, 1:].numel()
    reference = total.item() / count
    loss = evaluate.validation_loss(model, ids, batch_size=batch_size, chunk_tokens=chunk_tokens)
    assert loss == pytest.approx(reference, abs=1e-6)


def test_the_plan_counts_the_validation_loss_s_chunk():
    from secateurs import plan

    assert plan.LOSS_CHUNK_TOKENS == evaluate.LOSS_CHUNK_TOKENS


def test_lambada_docs_items_are_deterministic_and_shared_by_models_of_one_tokenizer(tiny_models, eval_data):
    validation = load_packed(eval_data)[0]["validation"].head(None)
    a = evaluate.lambada_docs_items(validation, load_tokenizer(tiny_models["llama-tied"]))
    b = evaluate.lambada_docs_items(validation, load_tokenizer(tiny_models["qwen2"]))
    assert a == b
    assert len(a) >= 20
    text = load_tokenizer(tiny_models["llama-tied"]).decode(validation.flatten().tolist())
    for item in a:
        passage = f"{item['context']} {item['target']}."
        assert 100 <= len(passage) <= 200
        assert item["target"].isalpha() and len(item["target"]) >= 3
        # The passage is real validation text once line breaks and indentation are folded.
        assert passage in " ".join(text.replace("|", " ").split())
    # A smaller n is an evenly spaced subset, in order.
    few = evaluate.lambada_docs_items(validation, load_tokenizer(tiny_models["qwen2"]), n=5)
    assert few == [a[k * len(a) // 5] for k in range(5)]


def test_real_model_beats_random_weights_on_lambada_docs(smollm2_dir, tiny_models, eval_data, tmp_path):
    real = evaluate.run(smollm2_dir, eval_data, tmp_path / "real", EvaluateConfig(max_sequences=1, limit=20))
    rand = evaluate.run(tiny_models["llama-untied"], eval_data, tmp_path / "rand", EvaluateConfig(max_sequences=1, limit=20))
    r, t = real["tasks"]["lambada-docs"], rand["tasks"]["lambada-docs"]
    assert r["n"] == t["n"] == 20
    # SmolLM2-135M gets 25-40% of python-docs last words exactly right at ~-4 to -6 nats per word; random
    # weights get none and pay more than log(vocab) = 10.8 nats per token.
    print(f"lambada-docs, 20 items: SmolLM2 {r}, random {t}")
    assert r["acc"] >= 0.1 and t["acc"] == 0.0
    assert r["log_likelihood"] > t["log_likelihood"] + 3
    assert real["validation_loss"] < rand["validation_loss"] - 3
    assert r["perplexity"] == math.exp(-r["log_likelihood"])

    # A hit is exact greedy decoding: acc is the share of items whose target's tokens generate() reproduces.
    model, tokenizer = load_model(smollm2_dir), load_tokenizer(smollm2_dir)
    validation = load_packed(eval_data)[0]["validation"].head(None)
    hits = 0
    for item in evaluate.lambada_docs_items(validation, tokenizer, n=20):
        context = tokenizer(item["context"])["input_ids"]
        target = tokenizer(item["context"] + " " + item["target"])["input_ids"][len(context) :]
        generated = model.generate(
            torch.tensor([context]), max_new_tokens=len(target), do_sample=False, pad_token_id=tokenizer.eos_token_id
        )[0, len(context) :]
        hits += generated.tolist() == target
    assert r["acc"] == hits / 20


@pytest.mark.parametrize("batch_size", [1, 4])  # 4: lm-eval pads the shorter continuations of a batch
def test_local_multiple_choice_task_matches_a_direct_computation(tiny_models, eval_data, tmp_path, batch_size):
    ours, _ = mc_task_files(tmp_path)
    model_dir = tiny_models["mistral"]
    settings = EvaluateConfig(tasks=[str(ours)], batch_size=batch_size, max_sequences=1)
    metrics = evaluate.run(model_dir, eval_data, tmp_path / "out", settings)

    model, tokenizer = load_model(model_dir), load_tokenizer(model_dir)
    acc = acc_norm = 0
    with torch.no_grad():
        for item in MC_ITEMS:
            ll = [direct_loglikelihood(model, tokenizer, item["question"], " " + c) for c in item["options"]]
            norm = [x / len(c) for x, c in zip(ll, item["options"])]
            acc += ll.index(max(ll)) == item["label"]
            acc_norm += norm.index(max(norm)) == item["label"]
    assert metrics["tasks"]["facts"] == {"acc": acc / 3, "acc_norm": acc_norm / 3, "n": 3}


@pytest.mark.parametrize("batch_size", [1, 4])  # 4: lm-eval right-pads a batch and sorts it by length
def test_last_word_tasks_through_lm_eval_match_a_plain_forward_pass(tiny_models, eval_data, tmp_path, batch_size):
    model_dir = tiny_models["llama-untied"]
    model, tokenizer = load_model(model_dir), load_tokenizer(model_dir)
    validation = load_packed(eval_data)[0]["validation"].head(None)
    lambada = evaluate.lambada_docs_items(validation, tokenizer, n=12)
    # A random model never guesses a lambada-docs word. In a local task, every other target is the model's own
    # greedy continuation (two tokens), so accuracy is neither 0 nor 1 and a wrong greedy check shows.
    items = [{"text": item["context"], "word": " " + item["target"]} for item in lambada]
    for item in items[1::2]:
        ids = tokenizer(item["text"])["input_ids"]
        greedy = model.generate(
            torch.tensor([ids]), max_new_tokens=2, do_sample=False, pad_token_id=tokenizer.eos_token_id
        )[0, len(ids) :]
        own = tokenizer.decode(greedy)
        if own.strip():
            item["word"] = own
    (tmp_path / "own.jsonl").write_text("".join(json.dumps(item) + "\n" for item in items))
    task_file = tmp_path / "own.yaml"
    task_file.write_text(
        "type: last_word\njsonl: own.jsonl\ncontext_field: text\nanswer_field: word\ntarget_delimiter: ''\n"
    )
    settings = EvaluateConfig(tasks=["lambada-docs", str(task_file)], batch_size=batch_size, max_sequences=1, limit=12)
    metrics = evaluate.run(model_dir, eval_data, tmp_path / "out", settings)

    pairs = {
        "lambada-docs": [(item["context"], " " + item["target"]) for item in lambada],
        "own": [(item["text"], item["word"]) for item in items],
    }
    for name, task_pairs in pairs.items():
        scores = reference_scores(model, tokenizer, task_pairs)
        acc, ll = sum(hit for _, hit in scores) / len(scores), sum(s for s, _ in scores) / len(scores)
        got = metrics["tasks"][name]
        assert got["n"] == len(scores) == 12
        assert got["acc"] == pytest.approx(acc, abs=1e-6)
        assert got["log_likelihood"] == pytest.approx(ll, abs=1e-6)
        assert got["perplexity"] == math.exp(-got["log_likelihood"])
    assert 0 < metrics["tasks"]["own"]["acc"] < 1


def test_lm_eval_task_file_agrees_with_the_generated_one(tiny_models, eval_data, tmp_path):
    pytest.importorskip("lm_eval", reason="lm-eval (the eval extra) is not installed")
    ours, theirs = mc_task_files(tmp_path)
    metrics = evaluate.run(tiny_models["qwen2"], eval_data, tmp_path / "out", EvaluateConfig(tasks=[str(ours), str(theirs)], max_sequences=1))
    ref, lm = metrics["tasks"]["facts"], metrics["tasks"]["facts_lm_eval"]
    assert lm["n"] == 3
    assert (lm["acc"], lm["acc_norm"]) == (ref["acc"], ref["acc_norm"])


def test_task_errors_come_before_any_model_load(unloadable_model, eval_data, tmp_path, monkeypatch):
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "lm_eval", None)  # as on a machine without the eval extra
        with pytest.raises(evaluate.EvaluationError) as e:
            evaluate.run(unloadable_model, eval_data, out, EvaluateConfig(tasks=["lambada-docs", "foo"]))
        assert str(e.value).startswith(
            "unknown task 'foo': built-in tasks: lambada-docs; or a path to a task YAML; or an lm-eval task name "
            "(lm-eval not installed"
        )
        with pytest.raises(evaluate.EvaluationError, match=r"scored by lm-eval, which is not installed: pip install"):
            evaluate.run(unloadable_model, eval_data, out, EvaluateConfig(tasks=["lambada-docs"]))
    with pytest.raises(evaluate.EvaluationError, match="task file .*missing.yaml does not exist"):
        evaluate.run(unloadable_model, eval_data, out, EvaluateConfig(tasks=[str(tmp_path / "missing.yaml")]))
    bad = tmp_path / "bad.yaml"
    bad.write_text("type: multiple_choice\njsonl: items.jsonl\n")
    (tmp_path / "items.jsonl").write_text('{"context": "a", "choices": ["b", "c"], "answer": 2}\n')
    with pytest.raises(
        evaluate.EvaluationError, match=r"items.jsonl:1: field 'answer'=2 must be a choice index 0..1"
    ):
        evaluate.run(unloadable_model, eval_data, out, EvaluateConfig(tasks=[str(bad)]))
    bad.write_text("type: multiple_choise\njsonl: items.jsonl\n")
    with pytest.raises(evaluate.EvaluationError, match=r"bad.yaml: type='multiple_choise': Input should be"):
        evaluate.run(unloadable_model, eval_data, out, EvaluateConfig(tasks=[str(bad)]))
    with pytest.raises(evaluate.EvaluationError, match="few-shot count applies only to lm-eval tasks"):
        evaluate.run(unloadable_model, eval_data, out, EvaluateConfig(tasks=["lambada-docs:5"]))
    assert not out.exists()


def test_lm_eval_registry_names_are_checked_before_any_model_load(unloadable_model, eval_data, tmp_path):
    pytest.importorskip("lm_eval", reason="lm-eval (the eval extra) is not installed")
    with pytest.raises(
        evaluate.EvaluationError, match=r"unknown task 'foo'.*lm-eval [\d.]+ has none called 'foo'"
    ):
        evaluate.run(unloadable_model, eval_data, tmp_path / "out", EvaluateConfig(tasks=["foo"]))
    # The tests run with the hub off (conftest): a registry task whose dataset is not cached fails naming itself.
    with pytest.raises(
        evaluate.EvaluationError, match=r"lm-eval task 'hellaswag': cannot load its dataset \(the hub is off"
    ):
        evaluate.run(unloadable_model, eval_data, tmp_path / "out", EvaluateConfig(tasks=["hellaswag:10"]))


def test_dataset_of_another_tokenizer_is_refused_before_any_model_load(
    unloadable_model, tokenizer_dir, docs_dir, tmp_path
):
    other = tmp_path / "other-tokenizer"
    tokenizer = load_tokenizer(tokenizer_dir)
    tokenizer.add_tokens(["<secateurs-test-token>"])
    tokenizer.save_pretrained(other)
    data = tmp_path / "data"
    prepare_data(other, data, DataConfig(source=str(docs_dir), seq_len=32, max_tokens=32 * 4, val_fraction=0.5))
    with pytest.raises(DataError, match="was tokenized with tokenizer .* but the model's tokenizer is"):
        evaluate.run(unloadable_model, data, tmp_path / "out")
