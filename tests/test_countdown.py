"""Countdown reward on hand-written completions, and the safe evaluator on hostile input."""

import json
import random
import re
import time
from pathlib import Path

import pytest

from es_mpi.config import ConfigError
from es_mpi.config_load import load_config
from es_mpi.tasks import make_task
from es_mpi.tasks.countdown import (
    countdown_reward,
    full_format,
    generate_problems,
    generated_split,
    last_answer,
    problem_key,
)
from es_mpi.tasks.safe_arith import evaluate

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "countdown.json"
NUMS, TARGET = [44, 19, 35], 98.0
GOOD = "<think>add them</think>\n<answer>(44 + 19) + 35</answer>"


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        (GOOD, 1.1),  # full format + correct
        ("<answer>44+19+35</answer>", 0.05 + 1.0),  # answer block only
        ("<think>x</think> <answer>44+19+35</answer>", 0.06 + 1.0),  # not the exact layout
        ("<think>x</think>\n<answer>44+19+36</answer>", 0.1),  # wrong numbers
        ("<think>x</think>\n<answer>44+44+35</answer>", 0.1),  # reused number
        ("<think>x</think>\n<answer>44+19</answer>", 0.1),  # missing number
        ("<think>x</think>\n<answer>44*19-35</answer>", 0.1),  # right numbers, wrong value
        ("44+19+35", 0.0),  # missing tags
        ("<think>x</think>", 0.01),
        ("<think>x</think>\n<answer>9**9**9</answer>", 0.1),
        ("<think>x</think>\n<answer>1/0</answer>", 0.1),
        ("<think>x</think>\n<answer>((44+19)+35</answer>", 0.1),  # unbalanced
        ("<think>x</think>\n<answer>" + "9" * 10_000 + "</answer>", 0.1),  # overlong answer
        ("<think>x</think>\n<answer>__import__('os')</answer>", 0.1),
        ("<answer>1+1</answer><answer>35+19+44</answer>", 0.05 + 1.0),  # the last answer counts
    ],
)
def test_reward_on_hand_written_completions(completion, expected):
    assert countdown_reward(completion, NUMS, TARGET) == pytest.approx(expected)


def test_prompt_ending_in_think_counts_as_the_opening_tag():
    completion = "add them</think>\n<answer>44+19+35</answer>"
    assert countdown_reward(completion, NUMS, TARGET, prefix="<think>") == pytest.approx(1.1)
    assert countdown_reward(completion, NUMS, TARGET) == pytest.approx(1.05)


def test_decimal_target():
    assert countdown_reward("<answer>(1+1)/5*137</answer>", [1, 1, 5, 137], 54.8) >= 1.0


@pytest.mark.parametrize(
    "hostile",
    [
        "9**9**9",
        "99**99**99",
        "1/0",
        "(" * 5000 + "1" + ")" * 5000,
        "9" * 10_000,
        "-" * 100_000 + "1",
        "1" + "*99999999" * 20,
        "((((",
        "1+",
        "2//3",
        "1e9",
        "1.5",
    ],
)
def test_hostile_answers_rejected_fast(hostile):
    start = time.perf_counter()
    assert evaluate(hostile) is None
    reward = countdown_reward(f"<answer>{hostile}</answer>", NUMS, TARGET)
    assert reward <= 0.05 + 1e-9
    assert time.perf_counter() - start < 0.01


def test_safe_evaluator_values():
    assert evaluate("(1 + 2) * 3 - 4 / 2") == (7.0, [1, 2, 3, 4, 2])
    assert evaluate("-3 + 5") == (2.0, [3, 5])


def test_generated_problems_have_correct_solutions():
    for record in generate_problems(200, seed=5, sizes=(3, 4), number_max=20):
        value, used = evaluate(record["solution"])
        assert value == float(record["target"]) and sorted(used) == sorted(record["numbers"])


def _split(*overrides: str) -> tuple[list[dict], list[dict]]:
    return generated_split(load_config(None, ["task.name=countdown", *overrides]).task)


def test_heldout_split_stays_put_and_never_repeats_in_training():
    small_train, test = _split("task.train_size=300", "task.test_size=100")
    large_train, same_test = _split("task.train_size=5000", "task.test_size=100")
    assert same_test == test  # the held-out problems do not move with train_size
    assert [r["id"] for r in test] == list(range(2000, 2100))  # task.countdown.heldout_start
    held_out = {problem_key(r) for r in test}
    for train in (small_train, large_train):
        assert not held_out & {problem_key(r) for r in train}
    assert len(small_train) == 300 and len(large_train) == 5000
    assert large_train[: len(small_train)] == small_train  # a longer stream extends the shorter
    # the stream repeats problems: without the filter some training problems would be held out
    stream = generate_problems(5100, seed=1234, sizes=(3, 3), number_max=20)
    assert any(problem_key(r) in held_out for r in stream[:2000] + stream[2100:])


def test_a_problem_space_too_small_for_the_split_is_a_config_error():
    with pytest.raises(ConfigError, match="task.train_size"):
        _split(
            "task.countdown.number_max=1",
            "task.countdown.heldout_start=0",
            "task.test_size=20",
            "task.train_size=10",
            "task.prompts_per_member=4",
        )


def paper_data_config(template: str):
    """The paper's split of its 2,200 problems: first 200 train, last 2,000 test."""
    sets = [f"task.countdown.data_path={DATA}", "task.train_size=200", "task.test_size=2000"]
    return load_config(None, ["task.name=countdown", "task.prompts_per_member=8", *sets, template])


@pytest.mark.skipif(not DATA.is_file(), reason="shared Countdown data not present")
def test_reads_the_paper_format():
    cfg = paper_data_config("task.countdown.template={context}")
    task = make_task(cfg.task)
    assert len(task.train) == 200 and len(task.test) == 2000
    assert task.train[0].prompt.endswith("<think>") and "[44 19 35]" in task.train[0].prompt
    assert any(e.answer[1] != int(e.answer[1]) for e in task.test)  # decimal targets parsed
    assert task.score("x</think>\n<answer>44+19+35</answer>", task.train[0]) == pytest.approx(1.1)


def test_partial_credit_for_the_right_numbers_only():
    wrong_value = "<think>x</think>\n<answer>44*19-35</answer>"
    wrong_numbers = "<think>x</think>\n<answer>44+19+36</answer>"
    assert countdown_reward(wrong_value, NUMS, TARGET, partial=0.3) == pytest.approx(0.4)
    assert countdown_reward(wrong_numbers, NUMS, TARGET, partial=0.3) == pytest.approx(0.1)
    assert countdown_reward(GOOD, NUMS, TARGET, partial=0.3) == pytest.approx(1.1)


def test_graded_partial_credit_counts_the_given_numbers_used():
    def graded(answer: str) -> float:
        text = f"<think>x</think>\n<answer>{answer}</answer>"
        return countdown_reward(text, NUMS, TARGET, partial=0.3, graded=True)

    assert graded("44+19+35") == pytest.approx(1.1)  # right answer: full reward, not partial
    assert graded("44*19-35") == pytest.approx(0.1 + 0.3)  # all three numbers, wrong value
    assert graded("44+19+36") == pytest.approx(0.1 + 0.3 * 2 / 3)  # two of three
    assert graded("44+44+44") == pytest.approx(0.1 + 0.3 * 1 / 3)  # reuse counts once
    assert graded("44+19+35+1") == pytest.approx(0.1 + 0.3 * 3 / 4)  # extra number
    assert graded("1+2") == pytest.approx(0.1)  # none of them
    assert graded("44+(19") == pytest.approx(0.1)  # unparseable: no answer credit


def test_task_config_switches_graded_credit_on():
    overrides = ["task.name=countdown", "task.countdown.partial_credit=0.3"]
    plain = make_task(load_config(None, overrides).task)
    graded = make_task(
        load_config(None, [*overrides, "task.countdown.partial_credit_per_number=true"]).task
    )
    example = plain.train[0]
    numbers, _, _ = example.answer
    two_of_three = f"</think>\n<answer>{numbers[0]}+{numbers[1]}+999</answer>"
    assert plain.score(two_of_three, example) == pytest.approx(0.1)
    assert graded.score(two_of_three, example) == pytest.approx(0.1 + 0.3 * 2 / 3)
    near = make_task(
        load_config(None, [*overrides, "task.countdown.partial_credit_closeness=true"]).task
    )
    # a problem whose numbers summed miss the target by less than the target itself
    example = next(e for e in plain.train if 0 < abs(sum(e.answer[0]) - e.answer[1]) < e.answer[1])
    numbers, target, _ = example.answer
    all_three = f"</think>\n<answer>{numbers[0]}+{numbers[1]}+{numbers[2]}</answer>"
    assert plain.score(all_three, example) == pytest.approx(0.1 + 0.3)
    expected = 0.1 + 0.3 * (1 - abs(sum(numbers) - target) / target)
    assert near.score(all_three, example) == pytest.approx(expected)
    assert 0.1 < expected < 0.4


def test_closeness_credit_grows_as_the_answer_nears_the_target():
    def near(answer: str, graded: bool = False) -> float:
        text = f"<think>x</think>\n<answer>{answer}</answer>"
        return countdown_reward(text, NUMS, TARGET, partial=0.3, graded=graded, near=True)

    # NUMS 44 19 35, TARGET 98: credit 0.3 x (1 - |value - 98| / 98)
    assert near("44+19+35") == pytest.approx(1.1)  # right answer: full reward
    assert near("44+19*35") == pytest.approx(0.1)  # 709: a miss larger than the target, 0
    assert near("44-19+35") == pytest.approx(0.1 + 0.3 * (1 - 38 / 98))  # 60
    assert near("44+35-19") == near("44-19+35")  # same value, same credit
    assert near("(44+35)*19/19") == pytest.approx(0.1)  # numbers reused: no credit
    assert near("44+19+36") == pytest.approx(0.1)  # wrong numbers, ungraded: no credit
    assert near("44+19+36", graded=True) == pytest.approx(0.1 + 0.3 * 2 / 3 * (1 - 1 / 98))


REASONING = "Let me try 44 + 19 = 63, then 63 + 35 = 98. " * 120  # 5,280 characters


def test_a_right_answer_after_long_reasoning_scores_what_the_paper_gives():
    """max_new_tokens 1024 of a real tokenizer writes thousands of characters: a right
    answer after them is worth 1.1, as in the paper (no cap on the completion's length)."""
    assert len(REASONING) > 5000
    completion = REASONING + "</think>\n<answer>(44 + 19) + 35</answer>"
    assert countdown_reward(completion, NUMS, TARGET, prefix="<think>") == pytest.approx(1.1)
    assert countdown_reward("<think>" + completion, NUMS, TARGET) == pytest.approx(1.1)
    wrong = REASONING + "</think>\n<answer>44 + 19 - 35</answer>"
    assert countdown_reward(wrong, NUMS, TARGET, prefix="<think>") == pytest.approx(0.1)


HOSTILE_COMPLETIONS = [
    "<answer>" * 20_000,
    "</think>\n<answer>" * 10_000,
    "<think>" + "</think>\n<answer>" * 10_000 + "</answer>x",
    "<answer>" * 10_000 + "</answer>" * 10_000,
    "<think>" * 10_000 + "</think>" * 10_000,
    REASONING * 20 + "<answer>" + "(" * 100_000 + "</answer>",
    "<answer>99**99**99</answer>" * 5_000,
]


@pytest.mark.parametrize("hostile", HOSTILE_COMPLETIONS, ids=range(len(HOSTILE_COMPLETIONS)))
def test_hostile_long_completions_cost_under_10_ms(hostile):
    """Linear-time format and answer checks: no regex rescans the tail per unclosed tag."""
    seconds = []
    for _ in range(3):
        start = time.perf_counter()
        countdown_reward(hostile, NUMS, TARGET, prefix="<think>")
        seconds.append(time.perf_counter() - start)
    assert min(seconds) < 0.01


PAPER_FORMAT = re.compile(r"^<think>.*?</think>\n<answer>.*?</answer>$", re.DOTALL)
PAPER_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def test_linear_checks_agree_with_the_papers_regexes():
    pieces = ["<think>", "</think>", "\n", "<answer>", "</answer>", "1+2", "x", " "]
    rng = random.Random(0)
    for _ in range(20_000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 9)))
        assert full_format(text) == bool(PAPER_FORMAT.match(text)), repr(text)
        found = PAPER_ANSWER.findall(text)
        assert last_answer(text) == (found[-1] if found else None), repr(text)


@pytest.mark.skipif(not DATA.is_file(), reason="shared Countdown data not present")
def test_paper_template_rebuilds_every_records_context_word_for_word():
    records = json.loads(DATA.read_text())
    cfg = paper_data_config("task.countdown.template=paper")
    task = make_task(cfg.task)
    for example, record in zip(task.train + task.test, records, strict=True):
        assert example.prompt == record["context"]


def test_paper_template_on_generated_problems_and_context_needs_data():
    cfg = load_config(None, ["task.name=countdown", "task.countdown.template=paper"])
    example = make_task(cfg.task).train[0]
    assert example.prompt.startswith("You are a helpful assistant.")
    assert example.prompt.endswith("Let me solve this step by step.\n<think>")
    assert re.search(
        r"Using the numbers \[[ \d]+\], create an equation that equals \d+\.", example.prompt
    )
    chat = load_config(
        None,
        ["task.name=countdown", "task.countdown.template=paper", "task.chat.enabled=true"],
    )
    user = make_task(chat.task).train[0].prompt
    assert user.startswith("Using the numbers [") and user.endswith("</answer>.")
    with pytest.raises(ConfigError, match="task.countdown.template.*data_path"):
        load_config(None, ["task.name=countdown", "task.countdown.template={context}"])
