"""Built-in tasks, plug-in tasks, held-out scoring, pretraining and the eval command."""

import json

import pytest
import torch

from conftest import run_cli
from es_mpi.config import ConfigError, parse_scale_multipliers
from es_mpi.config_load import load_config
from es_mpi.tasks import make_task
from es_mpi.tasks.arithmetic import partial_match
from es_mpi.tasks.base import Example, train_without_heldout


def test_arithmetic_partial_credit():
    assert partial_match(" 57 ", "57") == 1.0
    assert partial_match("58", "57") == 0.25  # one of two characters right, halved
    assert partial_match("", "57") == 0.0


def test_multiplication_exact_product():
    cfg = load_config(None, ["task.name=multiplication", "task.multiplication.digits_a=3"])
    task = make_task(cfg.task)
    example = task.train[0]
    a, b = (int(x) for x in example.prompt.rstrip("=").split("*"))
    assert 100 <= a <= 999 and 0 <= b <= 9
    assert task.score(str(a * b), example) == 1.0
    assert task.score(str(a * b + 1), example) == 0.0


def test_splits_are_disjoint_and_sized():
    cfg = load_config(None, ["task.name=countdown", "task.train_size=300", "task.test_size=50"])
    task = make_task(cfg.task)
    assert (len(task.train), len(task.test)) == (300, 50)
    assert task.train[0].prompt.endswith("<think>")


@pytest.mark.parametrize(
    "overrides",
    [
        ["task.name=multiplication"],  # 2 x 1 digits: 900 problems, 844 of 2,000 repeated
        ["task.name=arithmetic", "task.arithmetic.digits=2"],
        ["task.name=arithmetic", "task.arithmetic.digits=1", "task.test_size=20"],
    ],
)
def test_generated_splits_never_train_on_a_heldout_problem(overrides):
    task = make_task(load_config(None, overrides).task)
    assert (len(task.train), len(task.test)) == (2000, 500 if len(overrides) < 3 else 20)
    held_out = {e.prompt for e in task.test}
    assert not any(e.prompt in held_out for e in task.train)


def test_train_without_heldout_keeps_order_tops_up_and_refuses_a_covered_space():
    def ex(n: int) -> Example:
        return Example(f"p{n}", n)

    fresh = iter(range(100, 200))
    train = train_without_heldout(
        [ex(1), ex(2), ex(3), ex(2)], [ex(2)], lambda k: [ex(next(fresh)) for _ in range(k)], 3
    )
    assert [e.prompt for e in train] == ["p1", "p3", "p100"]  # p2 held out, topped up in order
    with pytest.raises(ConfigError, match="'task.test_size'.*most of the problem space"):
        train_without_heldout([ex(1), ex(2), ex(2)], [ex(2)], lambda k: [ex(2)] * k, 3)
    tiny_space = load_config(None, ["task.name=multiplication", "task.multiplication.digits_a=1"])
    with pytest.raises(ConfigError, match="'task.test_size'"):
        make_task(tiny_space.task)  # 1 x 1 digits: 500 held-out cover the 100 problems


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("nosuchtask", "unknown task"),
        ("no_such_module_xyz:Task", "cannot import"),
        ("es_mpi.tasks.base:Example", "failed to start"),
        ("types:SimpleNamespace", "failed to start"),
    ],
)
def test_plugin_errors_name_the_field(name, message):
    cfg = load_config(None, [f"task.name={name}"])
    with pytest.raises(ConfigError, match=f"'task.name'.*{message}"):
        make_task(cfg.task)


def test_plugin_without_the_protocol(tmp_path, monkeypatch):
    (tmp_path / "notask.py").write_text(
        "class NoTask:\n    def __init__(self, cfg):\n        pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match="does not implement the Task protocol"):
        make_task(load_config(None, ["task.name=notask:NoTask"]).task)


def test_plugin_task_is_used(tmp_path, monkeypatch):
    (tmp_path / "mytask.py").write_text(
        "from es_mpi.tasks.base import Example\n"
        "class Echo:\n"
        "    name = 'echo'\n"
        "    def __init__(self, cfg):\n"
        "        self.train = [Example('1=', '1')] * cfg.train_size\n"
        "        self.test = [Example('2=', '2')]\n"
        "    def score(self, completion, example):\n"
        "        return float(completion == example.answer)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    task = make_task(load_config(None, ["task.name=mytask:Echo"]).task)
    assert task.name == "echo" and task.score("2", task.test[0]) == 1.0


@pytest.mark.slow
def test_eval_command_same_score_on_one_and_two_ranks(tiny_model_dir):
    args = [
        "eval",
        "--model",
        str(tiny_model_dir),
        "--task",
        "arithmetic",
        "--json",
        "--set",
        "task.test_size=20",
        "--set",
        "task.eval_batch=6",
        "--set",
        "task.max_new_tokens=3",
    ]
    one, two = run_cli(args), run_cli(args, ranks=2)
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    a, b = (
        json.loads(one.stdout.strip().splitlines()[-1]),
        json.loads(two.stdout.strip().splitlines()[-1]),
    )
    assert a["prompts"] == 20 and a["reward"] == b["reward"] and a["accuracy"] == b["accuracy"]


@pytest.mark.slow
@pytest.mark.parametrize("tag_tokens", [False, True])
def test_pretrain_writes_a_loadable_model(tmp_path, tag_tokens):
    config = tmp_path / "c.yaml"
    config.write_text(
        "task:\n  name: countdown\n  test_size: 8\n  eval_batch: 8\n"
        "  max_new_tokens: 8\n  prompts_per_member: 8\n"
    )
    out = tmp_path / "model"
    result = run_cli(
        [
            "pretrain",
            "--out",
            str(out),
            "--steps",
            "3",
            "--batch",
            "4",
            "--hidden",
            "32",
            "--layers",
            "1",
            "--heads",
            "2",
            "--config",
            str(config),
        ]
        + (["--tag-tokens"] if tag_tokens else [])
    )
    assert result.returncode == 0, result.stderr
    record = json.loads((out / "pretrain.json").read_text())
    assert record["args"]["steps"] == 3 and record["heldout_prompts"] == 8
    assert record["args"]["tag_tokens"] is tag_tokens
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(out))
    tokenizer = AutoTokenizer.from_pretrained(str(out))  # the saved tokenizer keeps its tags
    assert len(tokenizer("</answer>", add_special_tokens=False).input_ids) == (
        1 if tag_tokens else 9
    )
    assert model.config.vocab_size == len(tokenizer)


def test_conciseness_reward_and_generated_pairs(tmp_path):
    data = tmp_path / "qa.json"
    data.write_text(
        json.dumps([{"question": "Capital of France?", "answers": ["Paris", "paris!"]}] * 3)
    )
    cfg = load_config(
        None,
        [
            "task.name=conciseness",
            f"task.conciseness.data_path={data}",
            "task.train_size=1",
            "task.test_size=1",
            "task.prompts_per_member=1",
        ],
    )
    task = make_task(cfg.task)
    assert task.score("Paris", task.test[0]) == 0.0
    assert task.score("It is Paris", task.test[0]) == -6.0
    generated = make_task(
        load_config(None, ["task.name=conciseness", "task.train_size=40", "task.test_size=10"]).task
    )
    assert generated.report_kl and len(generated.test) == 10
    assert all(e.answer > len("</think>\n<answer></answer>") for e in generated.test)


def test_k3_kl_is_zero_against_itself_and_positive_otherwise(tiny_config):
    import torch

    from es_mpi.comm import Comm
    from es_mpi.engine import Engine
    from es_mpi.evaluate import Evaluator, heldout_score

    engine = Engine.load(tiny_config, Comm.serial())
    task = make_task(tiny_config.task)
    evaluator = Evaluator(engine.model, engine.tokenizer, task, 4)
    base = engine.load_base_copy()
    same = heldout_score(evaluator, task.test, Comm.serial(), 4, base_model=base)
    assert same.kl == 0.0
    with torch.no_grad():
        for p in engine.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    moved = heldout_score(evaluator, task.test, Comm.serial(), 4, base_model=base)
    assert moved.kl > 0.0


def test_noise_robust_pretraining_restores_clean_weights():
    from es_mpi.pretrain import _perturb, _unperturb
    from es_mpi.tiny_model import tiny_llama

    model, _ = tiny_llama(32, 1, 2, 0)
    before = [p.detach().clone() for p in model.parameters()]
    clean = _perturb(model, 0.5, torch.Generator().manual_seed(0))
    moved = [not torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True)]
    assert any(moved)
    _unperturb(model, clean)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    assert _perturb(model, 0.0, torch.Generator()) == []


def test_pretraining_noise_multipliers_scale_each_tensors_noise():
    from es_mpi.pretrain import _perturb, _unperturb
    from es_mpi.tiny_model import tiny_llama

    model, _ = tiny_llama(32, 1, 2, 0)
    with torch.no_grad():  # norm gains start at exactly 1 (std 0: no noise to scale)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def noise(multipliers: str) -> dict[str, torch.Tensor]:
        pairs = parse_scale_multipliers(multipliers)
        clean = _perturb(model, 0.5, torch.Generator().manual_seed(0), pairs)
        moved = {n: p.detach() - before[n] for n, p in model.named_parameters()}
        _unperturb(model, clean)
        return moved

    plain, scaled = noise(""), noise("norm=10,embed=0")
    for name, delta in scaled.items():
        if "norm" in name:
            assert torch.allclose(delta, 10 * plain[name], rtol=1e-4, atol=1e-6), name
        elif "embed" in name:
            assert not delta.any(), name
        else:
            assert torch.equal(delta, plain[name]), name
    assert all(plain[n].any() for n in plain if "norm" in n or "embed" in n)


def test_pretrain_refuses_bad_noise_multipliers_before_training(tmp_path):
    out = tmp_path / "model"
    result = run_cli(["pretrain", "--out", str(out), "--noise-multipliers", "norm"])
    assert result.returncode == 2
    assert "pretrain --noise-multipliers: bad pair 'norm'" in result.stderr
    assert "Traceback" not in result.stderr and not out.exists()


def test_tag_tokens_shorten_completions_and_decode_back():
    from es_mpi.tasks.countdown import TINY_ANSWER_FORMAT
    from es_mpi.tiny_model import TAGS, char_tokenizer

    text = "3,5,7=22<think>" + TINY_ANSWER_FORMAT.format(solution="3*5+7")
    plain, tagged = char_tokenizer(), char_tokenizer(tag_tokens=True)
    plain_ids = plain(text, add_special_tokens=False).input_ids
    tagged_ids = tagged(text, add_special_tokens=False).input_ids
    assert len(plain_ids) == len(text)  # one token per character
    assert len(tagged_ids) == len(text) - sum(len(t) for t in TAGS) + len(TAGS)
    for tok, ids in ((plain, plain_ids), (tagged, tagged_ids)):
        assert tok.decode(ids, skip_special_tokens=True) == text  # tags are not special
    # the character vocabulary keeps its ids; a partial tag is characters
    assert tagged.convert_tokens_to_ids(list("0123<>")) == plain.convert_tokens_to_ids(
        list("0123<>")
    )
    assert (
        tagged("<thin", add_special_tokens=False).input_ids
        == plain("<thin", add_special_tokens=False).input_ids
    )


@pytest.mark.parametrize(
    ("task", "content", "problem"),
    [
        ("countdown", "not json", "is not readable JSON"),
        ("countdown", '{"numbers": [1]}', "non-empty JSON list"),
        ("countdown", "[]", "non-empty JSON list"),
        ("countdown", '[{"numbers": [1, 2], "target": "3"}, {"target": "3"}]', "record 1 lacks"),
        ("countdown", '[{"numbers": "1 2", "target": "3"}]', "record 0 has 'numbers'"),
        ("countdown", '[{"numbers": [1, 2], "target": "three"}]', "record 0 has a 'target'"),
        ("conciseness", "{", "is not readable JSON"),
        ("conciseness", "{}", "non-empty JSON list"),
        (
            "conciseness",
            '[{"question": "q", "answers": ["a"]}, {"question": "q"}]',
            "record 1 is not",
        ),
        ("conciseness", '[{"question": "q", "answers": []}]', "record 0 is not"),
    ],
)
def test_bad_data_files_name_the_field_the_file_and_the_record(tmp_path, task, content, problem):
    path = tmp_path / "bad.json"
    path.write_text(content)
    sets = [f"task.{task}.data_path={path}", "task.train_size=32", "task.test_size=0"]
    cfg = load_config(None, [f"task.name={task}", *sets])
    with pytest.raises(ConfigError, match=f"task.{task}.data_path.*bad.json.*{problem}"):
        make_task(cfg.task)
