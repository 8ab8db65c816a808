"""Real chat-model machinery on the shipped fixtures: architectures, chat templates, end ids,
the fast decoder on Qwen2 / Llama-3, and prompts built through the chat template."""

from __future__ import annotations

import filecmp
import json
from pathlib import Path

import pytest
import torch

from es_mpi.chat_fixtures import FAMILIES, build_fixture
from es_mpi.config import ChatConfig, ConfigError
from es_mpi.config_load import load_config
from es_mpi.decode import fast_decode_problem
from es_mpi.evaluate import Evaluator, resolve_decoder
from es_mpi.modelio import load_model, load_tokenizer
from es_mpi.prompts import Prompter, end_token_ids
from es_mpi.tasks import Example, make_task

MODELS = Path(__file__).resolve().parent.parent / "models"
FIXTURES = {"qwen2": "qwen2-tiny-chat", "llama3": "llama3-tiny-chat", "gemma3": "gemma3-tiny-chat"}
PRETRAINED = MODELS / "qwen2-countdown-chat"
CPU = torch.device("cpu")


def load(name: str):
    path = MODELS / FIXTURES[name]
    return load_model(path, "float32", CPU), load_tokenizer(path)


@pytest.mark.parametrize("name", list(FIXTURES))
def test_shipped_fixtures_rebuild_byte_for_byte(name, tmp_path):
    out = build_fixture(name, tmp_path / name)
    shipped = MODELS / FIXTURES[name]
    files = sorted(p.name for p in shipped.iterdir())
    assert files == sorted(p.name for p in out.iterdir())
    _, mismatch, errors = filecmp.cmpfiles(shipped, out, files, shallow=False)
    assert not mismatch and not errors


@pytest.mark.parametrize("name", list(FIXTURES))
def test_fixture_has_its_familys_machinery(name):
    model, tokenizer = load(name)
    cfg = model.config
    ends = json.loads((MODELS / FIXTURES[name] / "generation_config.json").read_text())
    ends = ends["eos_token_id"]
    assert isinstance(ends, list) and len(ends) == 2
    assert ends[0] != tokenizer.eos_token_id and ends[1] == tokenizer.eos_token_id
    assert tokenizer.convert_ids_to_tokens(ends[0]) == FAMILIES[name].end_of_turn
    assert end_token_ids(tokenizer, model.generation_config) == ends
    params = dict(model.named_parameters())
    if name == "qwen2":
        assert cfg.model_type == "qwen2" and cfg.tie_word_embeddings
        assert "model.layers.0.self_attn.q_proj.bias" in params
        assert cfg.num_key_value_heads < cfg.num_attention_heads
    elif name == "llama3":
        assert cfg.rope_parameters["rope_type"] == "llama3"
        assert "lm_head.weight" in params  # untied head
    else:
        assert cfg.model_type == "gemma3_text"
        assert "sliding_attention" in cfg.layer_types and "full_attention" in cfg.layer_types
        assert float(model.model.embed_tokens.embed_scale) == pytest.approx(cfg.hidden_size**0.5)
    for tag in ("<think>", "</think>", "<answer>", "</answer>"):
        assert len(tokenizer(tag, add_special_tokens=False).input_ids) == 1


MARKUP = {
    "qwen2": "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n"
    "<|im_start|>assistant\nA: <think>",
    "llama3": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nQ<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nA: <think>",
    "gemma3": "<bos><start_of_turn>user\nS\n\nQ<end_of_turn>\n<start_of_turn>model\nA: <think>",
}


@pytest.mark.parametrize("name", list(FIXTURES))
def test_chat_prompt_goes_through_the_template(name):
    _, tokenizer = load(name)
    chat = ChatConfig(enabled=True, system="S", assistant_prefix="A: <think>")
    prompter = Prompter(tokenizer, chat)
    assert prompter.render(Example("Q", None)) == MARKUP[name]
    raw = Prompter(tokenizer, ChatConfig())
    assert raw.render(Example("Q", None)) == "Q"


def test_chat_template_problems_are_config_errors(tmp_path):
    _, tokenizer = load("qwen2")
    tokenizer.chat_template = None
    with pytest.raises(ConfigError, match="task.chat.enabled.*no chat template"):
        Prompter(tokenizer, ChatConfig(enabled=True), "some/model")
    missing = tmp_path / "none.jinja"
    with pytest.raises(ConfigError, match="task.chat.template_file.*none.jinja"):
        Prompter(tokenizer, ChatConfig(enabled=True, template_file=str(missing)))
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}{{ m['content'] }")
    with pytest.raises(ConfigError, match="broken.jinja cannot render"):
        Prompter(tokenizer, ChatConfig(enabled=True, template_file=str(broken)))
    own = tmp_path / "own.jinja"
    own.write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}>")
    assert (
        Prompter(tokenizer, ChatConfig(enabled=True, template_file=str(own))).render(
            Example("Q", None)
        )
        == "[Q]>"
    )


def test_decoder_auto_picks_fast_where_it_runs():
    for name, expected in (("qwen2", "fast"), ("llama3", "fast"), ("gemma3", "hf")):
        model, _ = load(name)
        assert resolve_decoder("auto", model, vector_hooks=False) == expected, name
        assert resolve_decoder("auto", model, vector_hooks=True) == "hf"
        assert resolve_decoder("auto", model, int8=True) == "hf"
        assert resolve_decoder("hf", model, vector_hooks=False) == "hf"
    gemma, _ = load("gemma3")
    assert "gemma3_text" in fast_decode_problem(gemma)


@pytest.mark.parametrize("name", ["qwen2", "llama3"])
def test_fast_decoder_gives_generates_tokens_on_qwen2_and_llama3(name):
    """q/k/v biases and grouped KV heads (Qwen2), llama3 rotary scaling (Llama-3): the fast
    decoder's greedy tokens equal generate's, prompts through the chat template."""
    model, tokenizer = load(name)
    chat = ChatConfig(enabled=True, system="You add.", assistant_prefix="<think>")
    examples = [
        Example(f"Using the numbers [{i} {i + 3} 4], make {i + 9}.", None) for i in range(12)
    ]
    hf = Evaluator(model, tokenizer, None, 24, "hf", Prompter(tokenizer, chat))
    fast = Evaluator(model, tokenizer, None, 24, "fast", Prompter(tokenizer, chat))
    batch = hf.encode(examples)
    assert batch.attention_mask.min() == 0  # left padding is exercised
    out_hf, keep_hf = hf.generate(batch)
    out_fast, keep_fast = fast.generate(batch)
    assert torch.equal(out_hf, out_fast) and torch.equal(keep_hf, keep_fast)


def pretrained_evaluator(end_ids_from_generation_config: bool, decoder: str):
    cfg = load_config("configs/countdown-chat.yaml", ["task.train_size=64", "task.test_size=16"])
    model = load_model(PRETRAINED, "float32", CPU)
    tokenizer = load_tokenizer(PRETRAINED)
    if not end_ids_from_generation_config:  # what es-mpi did before: the tokenizer's eos only
        model.generation_config.eos_token_id = None
    task = make_task(cfg.task)
    prompter = Prompter(tokenizer, cfg.task.chat)
    evaluator = Evaluator(model, tokenizer, task, cfg.task.max_new_tokens, decoder, prompter)
    return evaluator, task


@pytest.mark.parametrize("decoder", ["hf", "fast"])
def test_completions_stop_on_the_first_end_id_that_is_not_the_tokenizers_eos(decoder):
    evaluator, task = pretrained_evaluator(True, decoder)
    im_end = evaluator.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert evaluator.end_ids[0] == im_end != evaluator.tokenizer.eos_token_id
    batch = evaluator.encode(task.train[:32])
    out, keep = evaluator.generate(batch)
    new = out[:, batch.input_ids.shape[1] :]
    last_kept = [row[mask][-1].item() for row, mask in zip(new, keep, strict=True)]
    assert last_kept.count(im_end) >= 28  # the base ends its answers with <|im_end|>
    texts = evaluator.decode(new, keep)
    ended = [t for t, last in zip(texts, last_kept, strict=True) if last == im_end]
    assert all(t.endswith("</answer>") and "<|im_end|>" not in t for t in ended)
    # With the tokenizer's eos only, the same completions run on past <|im_end|> ...
    old, task = pretrained_evaluator(False, decoder)
    old_texts = old.completions(batch)
    assert sum(t.endswith("</answer>") for t in old_texts) < len(ended) // 2
    # ... and the format reward (anchored at the end) is lost for them
    rewards = evaluator.score_texts(texts, batch)
    assert rewards.mean() > old.score_texts(old_texts, batch).mean()


def _broken_copy(tmp_path: Path, name: str, file: str, content: str | None) -> Path:
    """A copy of a fixture with one file replaced (content) or removed (None)."""
    import shutil

    model = tmp_path / name
    shutil.copytree(MODELS / FIXTURES[name], model)
    if content is None:
        (model / file).unlink()
    else:
        (model / file).write_text(content)
    return model


@pytest.mark.parametrize(
    ("file", "content", "message"),
    [
        ("config.json", "{not json", "model.path.*config.json' is not valid JSON"),
        ("config.json", '{"model_type": "no-such-arch"}', "model.path.*config.json.*causal LM"),
        ("generation_config.json", "[1,", "model.path.*generation_config.json' is not valid"),
        ("tokenizer.json", '{"version": 1}', "model.path.*cannot load a tokenizer"),
        ("chat_template.jinja", None, "task.chat.enabled.*no chat template"),
    ],
)
def test_bad_model_files_are_config_errors_naming_field_and_file(tmp_path, file, content, message):
    from es_mpi.session import check_inputs

    model = _broken_copy(tmp_path, "qwen2", file, content)
    cfg = load_config("configs/countdown-chat.yaml", [f"model.path={model}", "task.train_size=64"])
    with pytest.raises(ConfigError, match=message):
        check_inputs(cfg)


@pytest.mark.slow
def test_cli_refuses_bad_files_with_exit_2_and_starts_nothing(tmp_path):
    from conftest import run_cli

    model = _broken_copy(tmp_path, "gemma3", "chat_template.jinja", None)
    run_dir = tmp_path / "run"
    args = ["train", "--config", "configs/paper/gemma3-multiplication.yaml", "--run-dir"]
    result = run_cli([*args, str(run_dir), "--set", f"model.path={model}"], ranks=2)
    assert result.returncode == 2, result.stderr
    assert "task.chat.enabled" in result.stderr and str(model) in result.stderr
    assert "Traceback" not in result.stderr and not run_dir.exists()
    data = tmp_path / "countdown.json"
    data.write_text('[{"numbers": [1, 2], "target": "3"}, {"numbers": [1]}]')
    sets = ["--set", f"task.countdown.data_path={data}", "--set", "task.train_size=1"]
    sets += ["--set", "task.test_size=1", "--set", "task.prompts_per_member=1"]
    sets += ["--set", "model.path=models/qwen2-tiny-chat"]
    result = run_cli(
        ["train", "--config", "configs/paper/countdown.yaml", "--run-dir", str(run_dir), *sets]
    )
    assert result.returncode == 2, result.stderr
    assert "task.countdown.data_path" in result.stderr and "record 1 lacks" in result.stderr
    assert "Traceback" not in result.stderr and not run_dir.exists()
