"""One config tree for a run: YAML file + ``--set key=value`` overrides, validated on creation.

Every field has a docstring (shown by ``es-mpi train --help-config``). The whole tree is saved
into the run log, so a run can be resumed and replayed from its log alone. Reading files and
overrides into this tree: config_load.py.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from .errors import ConfigError

__all__ = ["Config", "ConfigError"]


SHAPINGS = ("zscore", "centered_rank", "top_pairs")
SIGMA_SCALES = ("none", "per_tensor_std")
EVAL_DTYPES = ("float32", "bfloat16", "float16", "int8")
ES_MODES = ("full", "lowrank")
SCHEDULES = ("constant", "linear", "cosine")
NONFINITE_POLICIES = ("fail", "worst")
LOWRANK_VECTORS = ("frozen", "full")
DEVICES = ("auto", "cpu", "cuda")
DECODERS = ("auto", "hf", "fast")


def _require(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config field '{name}': {message}")


def _require_schedule(prefix: str, schedule: str, final: float, decay_iterations: int) -> None:
    """Fields <prefix>_schedule, <prefix>_final, <prefix>_decay_iterations of a schedule."""
    _require(schedule in SCHEDULES, f"{prefix}_schedule", f"one of {SCHEDULES}")
    _require(0 <= final <= 1, f"{prefix}_final", "must be in [0, 1]")
    _require(
        schedule == "constant" or decay_iterations > 0,
        f"{prefix}_decay_iterations",
        f"must be > 0 when {prefix}_schedule is not constant",
    )


def parse_scale_multipliers(
    text: str, source: str = "config field 'es.scale_multipliers'"
) -> list[tuple[re.Pattern, float]]:
    """'norm=10,embed=2' -> [(re 'norm', 10.0), (re 'embed', 2.0)] (es.scale_multipliers);
    `source` names the setting in error messages."""
    pairs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        pattern, sep, factor = item.rpartition("=")
        try:
            value = float(factor)
            compiled = re.compile(pattern)
        except (ValueError, re.error) as exc:
            raise ConfigError(f"{source}: bad pair '{item}' ({exc})") from exc
        if not sep or not pattern or not (value >= 0 and math.isfinite(value)):
            raise ConfigError(f"{source}: '{item}' is not regex=factor with a finite factor >= 0")
        pairs.append((compiled, value))
    return pairs


def multiplier_for(name: str, pairs: list[tuple[re.Pattern, float]]) -> float:
    """The factor of the first pair whose regex matches `name` (1.0 when none does)."""
    return next((factor for pattern, factor in pairs if pattern.search(name)), 1.0)


@dataclass
class ModelConfig:
    path: str = "models/tiny-random"
    """Local directory of a Hugging Face causal LM (config.json, *.safetensors, tokenizer).
    Relative paths are resolved against the working directory. Nothing is downloaded."""
    eval_dtype: str = "float32"
    """dtype of the evaluation copy that perturbed weights are materialised into
    (float32, bfloat16, float16, or int8: weight-only int8 with per-channel scales for the
    untied Linear layers, full-parameter mode only). Master weights are always float32."""

    def __post_init__(self) -> None:
        _require(bool(self.path), "model.path", "must not be empty")
        _require(self.eval_dtype in EVAL_DTYPES, "model.eval_dtype", f"one of {EVAL_DTYPES}")


@dataclass
class ESConfig:
    population: int = 30
    """Members per iteration (N). Any N works with any number of ranks."""
    sigma: float = 1e-3
    """Noise scale: member n is evaluated at theta + sigma * eps_n."""
    alpha: float = 5e-4
    """Learning rate with 1/sigma folded in: theta += alpha/N * sum_n shaped_n * eps_n."""
    iterations: int = 100
    """Total number of iterations of the run (resume continues up to this number)."""
    alpha_schedule: str = "constant"
    """constant, linear or cosine: alpha at iteration t is es.alpha times a factor that falls
    from 1 at t = 0 to es.alpha_final at t = es.alpha_decay_iterations (a straight line or
    half a cosine) and stays there. Its own horizon, not es.iterations, so that extending a
    run on resume does not change the updates already logged."""
    alpha_final: float = 0.1
    """Factor of es.alpha reached at es.alpha_decay_iterations (alpha_schedule not constant)."""
    alpha_decay_iterations: int = 0
    """Iterations over which alpha decays (needed, > 0, when alpha_schedule is not constant)."""
    sigma_schedule: str = "constant"
    """constant, linear or cosine, as es.alpha_schedule but for sigma. ES raises the reward
    averaged over the noise; smaller noise later is meant to bring that average closer to
    the unperturbed model's (what is kept and scored). Replay does not depend on it (the
    update uses alpha and the seeds only)."""
    sigma_final: float = 0.5
    """Factor of es.sigma reached at es.sigma_decay_iterations (sigma_schedule not constant)."""
    sigma_decay_iterations: int = 0
    """Iterations over which sigma decays (needed, > 0, when sigma_schedule is not constant)."""
    shaping: str = "zscore"
    """Fitness shaping of the N rewards: zscore (Qiu et al.), centered_rank (Salimans et
    al.) or top_pairs (mirrored pairs only: z-scores of the es.top_pairs best pairs, the other
    pairs get 0; Mania et al. 2018)."""
    top_pairs: int = 0
    """Pairs kept by es.shaping top_pairs (1 .. population / 2)."""
    sigma_scale: str = "none"
    """none: one sigma for all tensors. per_tensor_std: sigma and alpha of each tensor are
    multiplied by that tensor's weight std in the base model (stored in the run log)."""
    antithetic: bool = False
    """Mirrored pairs: members 2k and 2k+1 share a seed with noise +eps and -eps."""
    noise_cache_mb: int = 256
    """Memory per rank (MiB) for keeping the noise of this rank's own members from evaluation
    to the update instead of generating it twice. Speed only: results are identical for any
    value; 0 disables. A member is cached whole or not at all."""
    perturb_only: str = ""
    """Regular expression on parameter names (re.search): only matching tensors are
    perturbed and updated, the others stay frozen (empty: all tensors). Applied through the
    per-tensor scales stored in the run log (a frozen tensor has scale 0)."""
    scale_multipliers: str = ""
    """Per-tensor factors on sigma and alpha, on top of es.sigma_scale: comma-separated
    regex=factor pairs (re.search on parameter names; a tensor takes the factor of the
    first pair that matches, 1 if none; 0 freezes it). Why: per_tensor_std gives RMSNorm
    gains (values near 1, std ~0.015) almost no noise; 'norm=10' lets ES move them.
    Stored in the run log with the per-tensor scales."""
    nonfinite_rewards: str = "fail"
    """A NaN or infinite member reward: fail (stop the job naming the member, its seed and
    the rank that scored it) or worst (score it as the lowest finite reward of the
    iteration; the replaced value is what the log keeps)."""
    mode: str = "full"
    """full: Gaussian noise on every parameter, materialised per member. lowrank: each 2-D
    weight (m x n) gets B A^T / sqrt(rank) with B (m x rank), A (n x rank), applied by hooks
    on nn.Linear / nn.Embedding without materialising it (EGGROLL)."""
    rank: int = 1
    """Rank r of the low-rank perturbation (es.mode lowrank)."""
    lowrank_vectors: str = "frozen"
    """1-D tensors (norm weights, biases) in lowrank mode: frozen (never perturbed or
    updated), or full (full Gaussian noise, one extra small forward call per member for
    each module other than a Linear bias)."""
    members_per_batch: int = 1
    """Members evaluated together in one batched forward pass (es.mode lowrank): groups of
    consecutive members are dealt whole to ranks, so batch shapes never depend on the rank
    count. A config value, never derived from memory or the number of ranks."""

    def __post_init__(self) -> None:
        _require(self.population >= 1, "es.population", "must be >= 1")
        _require(self.sigma > 0, "es.sigma", "must be > 0")
        _require(self.alpha >= 0, "es.alpha", "must be >= 0")
        _require(self.iterations >= 0, "es.iterations", "must be >= 0")
        _require(self.noise_cache_mb >= 0, "es.noise_cache_mb", "must be >= 0")
        _require(self.shaping in SHAPINGS, "es.shaping", f"one of {SHAPINGS}")
        for name in ("alpha", "sigma"):
            _require_schedule(
                f"es.{name}",
                getattr(self, f"{name}_schedule"),
                getattr(self, f"{name}_final"),
                getattr(self, f"{name}_decay_iterations"),
            )
        _require(self.sigma_scale in SIGMA_SCALES, "es.sigma_scale", f"one of {SIGMA_SCALES}")
        _require(self.mode in ES_MODES, "es.mode", f"one of {ES_MODES}")
        _require(
            self.nonfinite_rewards in NONFINITE_POLICIES,
            "es.nonfinite_rewards",
            f"one of {NONFINITE_POLICIES}",
        )
        try:
            re.compile(self.perturb_only)
        except re.error as exc:
            raise ConfigError(
                f"config field 'es.perturb_only': not a regular expression: {exc}"
            ) from exc
        parse_scale_multipliers(self.scale_multipliers)
        _require(self.rank >= 1, "es.rank", "must be >= 1")
        _require(
            self.lowrank_vectors in LOWRANK_VECTORS,
            "es.lowrank_vectors",
            f"one of {LOWRANK_VECTORS}",
        )
        _require(self.members_per_batch >= 1, "es.members_per_batch", "must be >= 1")
        # (model.eval_dtype int8 with es.mode lowrank is refused in Config.__post_init__)
        _require(
            self.members_per_batch == 1 or self.mode == "lowrank",
            "es.members_per_batch",
            "above 1 needs es.mode lowrank (full mode materialises one member at a time)",
        )
        _require(
            self.shaping != "top_pairs"
            or (self.antithetic and 1 <= self.top_pairs <= self.population // 2),
            "es.top_pairs",
            "es.shaping top_pairs needs es.antithetic true and 1 <= top_pairs <= population / 2",
        )
        _require(
            not self.antithetic or self.population % 2 == 0,
            "es.population",
            "must be even when es.antithetic is true",
        )


@dataclass
class ArithmeticConfig:
    digits: int = 2
    """Digits of each operand of 'a+b='."""

    def __post_init__(self) -> None:
        _require(1 <= self.digits <= 9, "task.arithmetic.digits", "must be in 1..9")


@dataclass
class MultiplicationConfig:
    digits_a: int = 2
    """Digits of the first factor."""
    digits_b: int = 1
    """Digits of the second factor."""
    template: str = "{a}*{b}="
    """Prompt template with {a} and {b}."""
    answer_pattern: str = ""
    """Regular expression whose first group is the answer (the last match counts, e.g.
    '<(\\d+)>'); empty: the whole stripped completion must be the product."""

    def __post_init__(self) -> None:
        _require(1 <= self.digits_a <= 9, "task.multiplication.digits_a", "must be in 1..9")
        _require(1 <= self.digits_b <= 9, "task.multiplication.digits_b", "must be in 1..9")
        for key in ("a", "b"):
            _require(
                "{" + key + "}" in self.template,
                "task.multiplication.template",
                f"must contain {{{key}}}",
            )
        if self.answer_pattern:
            try:
                groups = re.compile(self.answer_pattern).groups
            except re.error as exc:
                raise ConfigError(
                    f"config field 'task.multiplication.answer_pattern': {exc}"
                ) from exc
            _require(
                groups >= 1, "task.multiplication.answer_pattern", "needs a (group) for the answer"
            )


@dataclass
class CountdownConfig:
    data_path: str = ""
    """JSON file in the paper's format (id, context, numbers, target, solution): the first
    train_size records train, the last test_size records test. Empty: generate problems."""
    heldout_start: int = 2000
    """Generated problems: the held-out split is problems heldout_start .. heldout_start +
    test_size of the generated stream, whatever train_size is; training takes the other
    problems in stream order, skipping any with a held-out problem's numbers and target."""
    min_numbers: int = 3
    """Generated problems: fewest numbers per problem."""
    max_numbers: int = 3
    """Generated problems: most numbers per problem."""
    number_max: int = 20
    """Generated problems: numbers are drawn from 1..number_max."""
    template: str = "{numbers}={target}<think>"
    """Prompt template with {numbers} (space-separated), {target} and {context} (the
    record's own prompt, data_path records only), or 'paper': the prompt of Qiu et al. built
    from the numbers and target (the records' context, word for word; with task.chat.enabled
    its user part only, the system and assistant parts then come from task.chat)."""
    partial_credit: float = 0.0
    """Answer reward for an expression that uses exactly the given numbers but misses the
    target (0: the paper's reward). Held-out accuracy counts right answers only."""
    partial_credit_per_number: bool = False
    """Graded partial credit: any parseable wrong answer earns partial_credit x (given numbers
    it uses, multiset match) / max(numbers given, numbers used), so two of three right
    numbers earn 2/3 of it: a denser signal for ES on a weak base."""
    partial_credit_closeness: bool = False
    """Partial credit times closeness to the target, 1 - |value - target| / max(|target|, 1)
    floored at 0, so a near miss earns more than a far one."""

    def __post_init__(self) -> None:
        _require(1 <= self.min_numbers <= 6, "task.countdown.min_numbers", "must be in 1..6")
        _require(
            self.min_numbers <= self.max_numbers <= 6,
            "task.countdown.max_numbers",
            "must be in min_numbers..6",
        )
        _require(self.number_max >= 1, "task.countdown.number_max", "must be >= 1")
        _require(self.heldout_start >= 0, "task.countdown.heldout_start", "must be >= 0")
        _require(0 <= self.partial_credit < 1, "task.countdown.partial_credit", "must be in [0, 1)")
        _require(
            self.template == "paper" or "{" in self.template,
            "task.countdown.template",
            "must be 'paper' or a format string with {numbers}, {target} or {context}",
        )
        _require(
            "{context}" not in self.template or bool(self.data_path),
            "task.countdown.template",
            "{context} is the record's own prompt: it needs task.countdown.data_path "
            "(generated problems have none; use 'paper' for the paper's prompt)",
        )


@dataclass
class ConcisenessConfig:
    data_path: str = ""
    """JSON list of {"question", "answers"}; empty: questions from generated Countdown
    problems (task.countdown.*), answers their reference solutions."""


@dataclass
class ChatConfig:
    enabled: bool = False
    """Build every prompt with the tokenizer's chat template (a system message if
    task.chat.system is set, the task's prompt as the user message, the generation prompt),
    then append task.chat.assistant_prefix. False: the task's prompt is fed as raw text."""
    system: str = ""
    """System message (empty: none; templates without a system role fold it as they do)."""
    assistant_prefix: str = ""
    """Text the assistant's turn starts with, after the generation prompt (e.g. the paper's
    'Let me solve this step by step.\\n<think>'); it is part of the prompt, not scored,
    except that an opening <think> at its end counts for Countdown's format reward."""
    template_file: str = ""
    """A Jinja chat template file that replaces the tokenizer's own (empty: the tokenizer's
    chat_template, from tokenizer_config.json or chat_template.jinja)."""


@dataclass
class TaskConfig:
    name: str = "arithmetic"
    """Reward task: a built-in name (arithmetic, multiplication, countdown, conciseness) or
    'package.module:ClassName' (a class implementing es_mpi.tasks.Task)."""
    prompts_per_member: int = 32
    """Prompts in the batch every member is scored on (drawn per iteration, same for all)."""
    max_new_tokens: int = 8
    """Greedy decoding length limit per completion."""
    train_size: int = 2000
    """Problems in the training split."""
    test_size: int = 500
    """Problems in the held-out split."""
    data_seed: int = 1234
    """Seed of the generated problems (independent of the run seed)."""
    eval_every: int = 0
    """Score the held-out split every this many iterations (0: only before and after)."""
    eval_batch: int = 128
    """Prompts per forward pass in held-out evaluation (a fixed shape: rank-count invariant)."""
    arithmetic: ArithmeticConfig = field(default_factory=ArithmeticConfig)
    multiplication: MultiplicationConfig = field(default_factory=MultiplicationConfig)
    countdown: CountdownConfig = field(default_factory=CountdownConfig)
    conciseness: ConcisenessConfig = field(default_factory=ConcisenessConfig)
    chat: ChatConfig = field(default_factory=ChatConfig)

    def __post_init__(self) -> None:
        _require(bool(self.name), "task.name", "must not be empty")
        _require(self.prompts_per_member >= 1, "task.prompts_per_member", "must be >= 1")
        _require(self.max_new_tokens >= 1, "task.max_new_tokens", "must be >= 1")
        _require(
            self.train_size >= self.prompts_per_member,
            "task.train_size",
            "must be >= task.prompts_per_member",
        )
        _require(self.test_size >= 0, "task.test_size", "must be >= 0")
        _require(self.eval_every >= 0, "task.eval_every", "must be >= 0")
        _require(self.eval_batch >= 1, "task.eval_batch", "must be >= 1")


@dataclass
class RuntimeConfig:
    threads: int = 1
    """CPU threads per rank. Part of the result: CPU matrix products differ in the last bits
    with the thread count, so it is never derived from the rank count (docs/design.md,
    invariant 1)."""
    device: str = "auto"
    """auto (cuda:(local_rank % n_gpus) when CUDA is present, else cpu), cpu or cuda."""
    verify_every: int = 10
    """Every this many iterations all ranks hash their master weights and must agree
    (0: never; rank 0 still logs its checksum every iteration)."""
    time_limit_minutes: float = 0.0
    """Stop before an iteration that would end after this much wall time of the session
    (0: no limit): the estimate is the longest of the session's last 20 iterations
    (held-out evaluations and checkpoints included), and a session always runs at least one
    iteration. The stop scores the held-out split (after the limit), writes a checkpoint and
    exits 75 (resumable, no final/). Rank 0's clock decides for all ranks."""
    stop_margin_seconds: float = 60.0
    """When the job's end is known (ES_MPI_JOB_END, set by the job scripts, or
    SLURM_JOB_END_TIME), stop before an iteration whose estimate plus the last checkpoint's
    duration would end later than this many seconds before it (kept for the MPI shutdown and
    the requeue). Exit 75, as for time_limit_minutes."""

    tensorboard: bool = False
    """Also write TensorBoard scalars to RUN_DIR/tensorboard (needs the optional
    tensorboard package; the run log is always written)."""
    decoder: str = "auto"
    """Greedy decoding: hf (transformers' generate, any causal LM), fast (es_mpi.decode:
    Llama and Qwen2 architectures, float evaluation copies, es.mode full or lowrank with
    frozen vectors; preallocated KV cache, fused products, low-rank deltas added to each
    product; with a bfloat16 copy its matrix products run in bf16) or auto
    (fast where it supports the model and settings, hf otherwise; decided from the model, so
    the same on every rank and on resume). Part of the result: fast and hf agree in the last
    bits only, so greedy tokens can differ."""
    cuda_graphs: bool = True
    """With the fast decoder on a GPU: each new token's step is captured once per generation
    call in a CUDA graph and replayed (one launch per token instead of one per kernel from
    Python; the same kernels on the same shapes as an eager step). false: eager steps. No
    effect on the CPU."""

    def __post_init__(self) -> None:
        _require(self.threads >= 1, "runtime.threads", "must be >= 1")
        _require(self.decoder in DECODERS, "runtime.decoder", f"one of {DECODERS}")
        _require(self.device in DEVICES, "runtime.device", f"one of {DEVICES}")
        _require(self.time_limit_minutes >= 0, "runtime.time_limit_minutes", "must be >= 0")
        _require(self.stop_margin_seconds >= 0, "runtime.stop_margin_seconds", "must be >= 0")
        _require(self.verify_every >= 0, "runtime.verify_every", "must be >= 0")


@dataclass
class CheckpointConfig:
    every: int = 10
    """Write master weights every this many iterations (0: only the final model)."""
    keep: int = 3
    """Number of newest periodic checkpoints kept on disk."""

    def __post_init__(self) -> None:
        _require(self.every >= 0, "checkpoint.every", "must be >= 0")
        _require(self.keep >= 1, "checkpoint.keep", "must be >= 1")


@dataclass
class GRPOSettings:
    """The GRPO baseline (`es-mpi grpo`, es_mpi/grpo.py, TRL's GRPOTrainer): the same model,
    task, reward and held-out evaluation as ES. Defaults are TRL's where they suit a CPU and
    a small model; the learning rate is ours (docs/results.md). ES runs ignore this section."""

    num_generations: int = 8
    """Completions sampled per prompt (the group whose rewards are normalised; TRL default)."""
    prompts_per_step: int = 8
    """Prompts per optimiser step: each step generates prompts_per_step x num_generations."""
    learning_rate: float = 1e-4
    """AdamW learning rate. TRL's default 1e-6 is for billion-parameter models; 1e-4 was the
    best of 1e-5 / 1e-4 / 1e-3 on the default's base (docs/results.md)."""
    temperature: float = 1.0
    """Sampling temperature of the rollouts (TRL default)."""
    beta: float = 0.0
    """KL coefficient against the reference model (TRL default 0: no reference model)."""
    max_completion_length: int = 0
    """Tokens per sampled completion; 0: task.max_new_tokens."""
    threads: int = 2
    """CPU threads of the GRPO process."""

    def __post_init__(self) -> None:
        _require(self.num_generations >= 2, "grpo.num_generations", "must be >= 2")
        _require(self.prompts_per_step >= 1, "grpo.prompts_per_step", "must be >= 1")
        _require(self.learning_rate > 0, "grpo.learning_rate", "must be > 0")
        _require(self.temperature > 0, "grpo.temperature", "must be > 0")
        _require(self.beta >= 0, "grpo.beta", "must be >= 0")
        _require(self.max_completion_length >= 0, "grpo.max_completion_length", "must be >= 0")
        _require(self.threads >= 1, "grpo.threads", "must be >= 1")


@dataclass
class Config:
    seed: int = 0
    """Run seed: member seeds and prompt batches of iteration t derive from (seed, t)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    es: ESConfig = field(default_factory=ESConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    grpo: GRPOSettings = field(default_factory=GRPOSettings)

    def __post_init__(self) -> None:
        _require(0 <= self.seed < 2**63, "seed", "must be in [0, 2**63)")
        _require(
            not (self.model.eval_dtype == "int8" and self.es.mode == "lowrank"),
            "model.eval_dtype",
            "int8 is for es.mode full (low-rank hooks add to float activations)",
        )
        _require(
            not (
                self.runtime.decoder == "fast"
                and self.es.mode == "lowrank"
                and self.es.lowrank_vectors == "full"
            ),
            "runtime.decoder",
            "fast adds low-rank deltas to matrices only (es.lowrank_vectors full needs hf)",
        )
        _require(
            not (self.runtime.decoder == "fast" and self.model.eval_dtype == "int8"),
            "runtime.decoder",
            "fast needs float weights (model.eval_dtype float32, bfloat16 or float16)",
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)
