"""Start-up of one rank: threads, device, model, tokenizer, master weights."""

from __future__ import annotations

import copy
import os
import platform
import resource
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import replace_dir
from .comm import Comm
from .config import Config
from .modelio import (
    load_model,
    load_tokenizer,
    model_class,
    read_fp32_weights,
    read_weights_into,
    save_hf_dir,
)
from .noise import NEW_RUN_KIND
from .perturb import MasterWeights
from .quant import quantise_linears


def set_threads(threads: int) -> None:
    """Fix the CPU thread count: it is part of a run's result (docs/design.md, invariant 1)."""
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:  # already set in this process (tests run several engines)
        pass


def pick_device(requested: str, local_rank: int) -> torch.device:
    """One device per rank: cuda:(local_rank % n_gpus) when CUDA is there, else the CPU."""
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError(f"runtime.device is 'cuda' but {cuda_problem()}")
    make_cuda_deterministic()
    # CUDA_VISIBLE_DEVICES already narrowed by the scheduler is honoured: torch numbers the
    # visible devices only, and node-local rank k takes the k-th of them.
    device = torch.device("cuda", local_rank % torch.cuda.device_count())
    torch.cuda.set_device(device)  # kernels and allocations without an explicit device go here
    return device


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued kernels (before reading a clock; no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cuda_problem() -> str:
    """Why torch sees no GPU: a CPU-only build (a conda/pip solve without CUDA), or none
    visible to this process (no GPU requested, CUDA_VISIBLE_DEVICES, driver)."""
    if torch.version.cuda is None:
        return (
            f"this torch {torch.__version__} is a CPU-only build (install a CUDA build: "
            "environment.yml, docs/clusters.md)"
        )
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "(unset)")
    return (
        f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU on "
        f"{socket.gethostname()} (CUDA_VISIBLE_DEVICES={visible})"
    )


def device_description(device: torch.device) -> str:
    """What a run log records of a rank's device (with its session): the GPU model and SM
    count, or the CPU's architecture and the torch kernel set in use."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} (sm_{props.major}{props.minor}, {props.multi_processor_count} SMs)"
    return f"cpu {platform.machine()} ({torch.backends.cpu.get_cpu_capability()})"


def software_versions() -> dict[str, str | None]:
    import transformers

    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
    }


def make_cuda_deterministic() -> None:
    """Deterministic GPU kernels, so a member's reward does not depend on run-to-run kernel
    choices (rank-count invariance on GPU, docs/design.md, invariant 1). cuBLAS reads its
    workspace setting when it first initialises, hence before any CUDA work."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class Engine:
    """What every rank holds: its model replica (the evaluation copy) and the master weights."""

    cfg: Config
    comm: Comm
    device: torch.device
    model: torch.nn.Module
    tokenizer: object
    weights: MasterWeights
    rss_before_model: int
    model_path: str
    load_seconds: float  # model, master weights and tokenizer

    def save_master(self, out: Path, dtype: str = "float32") -> None:
        """The master weights as an HF directory at `out`, written beside it and swapped in
        whole (a crash leaves the old directory or the new one, never half of one)."""
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        save_hf_dir(self.model, self.tokenizer, self.weights.state_dict(), tmp, dtype)
        replace_dir(tmp, out)

    def load_base_copy(self) -> torch.nn.Module:
        """An untouched copy of the base model in the evaluation dtype (float32 for int8),
        e.g. the reference for KL: the evaluation copy's structure, filled from the weight
        files a chunk at a time (loading it anew would hold the mapped file as well)."""
        if self.cfg.model.eval_dtype == "int8":
            return load_model(self.model_path, "float32", self.device)
        base = copy.deepcopy(self.model)
        if not read_weights_into(self.model_path, dict(base.named_parameters())):
            raise RuntimeError(f"'{self.model_path}': weight names differ from the model's")
        return base

    @classmethod
    def load(
        cls,
        cfg: Config,
        comm: Comm,
        model_path: str | Path | None = None,
        noise_kind: str = NEW_RUN_KIND,
        fingerprint_kind: str = "sums",
    ) -> Engine:
        """Load this rank's replica. The kinds are the run log's (noise.py, fingerprint.py)."""
        set_threads(cfg.runtime.threads)
        device = pick_device(cfg.runtime.device, comm.local_rank)
        path = model_path or cfg.model.path
        architecture, config = model_class(path)  # imported before the memory baseline
        rss_before = current_rss_bytes()
        t_start = time.perf_counter()
        int8 = cfg.model.eval_dtype == "int8"
        load_dtype = "float32" if int8 else cfg.model.eval_dtype
        model = load_model(path, load_dtype, device, architecture, config, fuse=not int8)
        master, int8_targets = None, {}
        if int8:  # fp32 master first, then the Linear weights become int8
            master = {n: p.detach().clone() for n, p in model.named_parameters()}
            int8_targets = quantise_linears(model)
        elif load_dtype != "float32":  # the master must not be the rounded eval copy
            master = read_fp32_weights(path, [n for n, _ in model.named_parameters()], device)
            if master is None:
                raise RuntimeError(f"'{path}': weight names differ from the model's parameters")
        weights = MasterWeights(
            model,
            master,
            cfg.es.noise_cache_mb * 2**20,
            extra_targets=int8_targets,
            noise_kind=noise_kind,
            fingerprint_kind=fingerprint_kind,
            lanes=cfg.runtime.threads,
        )
        if cfg.es.mode == "lowrank":
            weights.use_lowrank(cfg.es.rank, cfg.es.lowrank_vectors == "full")
        tokenizer = load_tokenizer(path)
        seconds = time.perf_counter() - t_start
        return cls(cfg, comm, device, model, tokenizer, weights, rss_before, str(path), seconds)
