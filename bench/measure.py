"""The measuring code: the device a row runs on, clocks and peak memory there, the matmul peak, FLOPs and MFU.

Every row (tutorial, Trainer, tool) is measured the same way on the same device:

- **device**: `cuda` when a GPU is present (unless `--device cpu`), else `cpu`; every row runs there.
- **time**: wall clock around the phase, with `torch.cuda.synchronize()` before the clock is read on a GPU (CUDA
  work is asynchronous: without it a phase would stop the clock while its last kernels are still queued).
- **memory**: on a GPU `torch.cuda.max_memory_allocated` of the row's process (reset when the row starts); on a
  CPU the process's own peak RSS (taken by the parent with os.wait4).
- **peak**: the best dense square matmul rate in each precision, after a warm-up, in its own process. On a GPU it
  is timed with CUDA events around a batch of matmuls; on a CPU with the wall clock. fp32 is strict fp32 on both
  (TF32 off: every fp32 row runs with TF32 off too, so that "fp32" is one precision); bf16 is bfloat16 inputs.
- **MFU**: real (non-padding) tokens/s x FLOPs per real token / the peak of the row's precision, with
      training FLOPs per real token = 6 * N + 12 * L * H * S
      forward FLOPs per real token  = 2 * N + 4 * L * H * S
  where N = parameters outside the embedding layer, L = layers, H = hidden size, S = mean real tokens per pair.
"""

from __future__ import annotations

import contextlib
import time

# bf16 slower than this fraction of fp32 means it is emulated (no bf16 units: AVX2-only CPUs, pre-Ampere GPUs).
EMULATED_BELOW = 0.5


# ------------------------------------------------------------------------------------------------- the device

def resolve_device(choice: str) -> str:
    """'cpu' or 'cuda' for --device auto/cpu/cuda; SystemExit when cuda is asked of a machine without it."""
    import torch

    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda: torch sees no CUDA GPU here")
    return choice


def describe_device(device: str) -> str:
    """'cpu', or 'cuda (NVIDIA H100 80GB HBM3)'."""
    import torch

    return f"cuda ({torch.cuda.get_device_name(0)})" if device == "cuda" else "cpu"


def synchronize(device: str) -> None:
    """Wait for the device's queued work: call before reading a clock on a GPU."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def autocast(device: str, precision: str):
    """The tutorial's mixed precision: bf16 autocast on the row's device (a no-op context for fp32)."""
    import torch

    return torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16")


def strict_fp32() -> None:
    """fp32 matmuls in full fp32 (no TF32), as the peak's fp32 is measured. Called by every row process."""
    import torch

    torch.set_float32_matmul_precision("highest")


class Memory:
    """Peak GPU memory of this process since `start()`: torch.cuda.max_memory_allocated, in MB; None on a CPU
    (there the parent measures the peak RSS)."""

    def __init__(self, device: str):
        self.device = device

    def start(self) -> Memory:
        if self.device == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats()
        return self

    def peak_mb(self) -> float | None:
        if self.device != "cuda":
            return None
        import torch

        return torch.cuda.max_memory_allocated() / 2**20


def row_record(device: str, memory: Memory) -> dict:
    """What every row reports about where it ran."""
    return {"device": describe_device(device), "gpu_peak_memory_mb": memory.peak_mb()}


# ------------------------------------------------------------------------------------------------- matmul peak

def matmul_gflops(n: int, seconds: float, count: int = 1) -> float:
    """GFLOP/s of `count` n x n x n matmuls done in `seconds` (2 n^3 FLOPs each)."""
    return 2 * n**3 * count / seconds / 1e9


def bf16_is_emulated(fp32_gflops: float, bf16_gflops: float) -> bool:
    return bf16_gflops < EMULATED_BELOW * fp32_gflops


def cpu_matmul_rates(n: int, dtype, repeats: int) -> list[float]:
    """GFLOP/s of `repeats` timed n x n matmuls on the CPU (after two untimed ones)."""
    import torch

    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    out = torch.empty(n, n, dtype=dtype)
    for _ in range(2):
        torch.mm(a, b, out=out)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        rates.append(matmul_gflops(n, time.perf_counter() - start))
    return rates


def cuda_matmul_rates(n: int, dtype, repeats: int, batch: int = 10, warmup: int = 5) -> list[float]:
    """GFLOP/s of `repeats` batches of `batch` n x n matmuls on the GPU, each batch timed with CUDA events (the
    GPU's own clock, no host round trip inside the timed part), after `warmup` untimed matmuls (cuBLAS picks and
    loads its kernel, the clocks ramp up)."""
    import torch

    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    out = torch.empty_like(a)
    for _ in range(warmup):
        torch.mm(a, b, out=out)
    torch.cuda.synchronize()
    rates = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(batch):
            torch.mm(a, b, out=out)
        end.record()
        end.synchronize()
        rates.append(matmul_gflops(n, start.elapsed_time(end) / 1e3, batch))  # elapsed_time is in ms
    return rates


def worker_peak(spec: dict) -> dict:
    """The matmul peak of `spec["device"]` in fp32 (strict) and bf16: {fp32_gflops, bf16_gflops, bf16_emulated,
    every rate}.

    On a CPU each precision is probed at 256x256 first: bf16 under half of fp32 there is emulated (1 GFLOP/s was
    measured on an AVX2-only CPU, where a 2048 matmul takes 20 s), so the probe's rate is kept as its peak instead
    of timing the full size, and the bench skips the bf16 rows. On a GPU both precisions are timed at full size.
    """
    import torch

    torch.set_num_threads(spec["threads"])
    strict_fp32()
    device, size, repeats = spec["device"], spec["size"], spec["repeats"]
    result = {"device": describe_device(device), "size": size, "repeats": repeats,
              "timer": "CUDA events" if device == "cuda" else "wall clock"}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        if device == "cuda":
            rates = cuda_matmul_rates(size, dtype, repeats)
        else:
            probe = max(cpu_matmul_rates(256, dtype, 3))
            result[f"{name}_probe_gflops"] = probe
            emulated = name == "bf16" and bf16_is_emulated(result["fp32_probe_gflops"], probe)
            rates = [probe] if emulated else cpu_matmul_rates(size, dtype, repeats)
        result.update({f"{name}_gflops": max(rates), f"{name}_all_gflops": rates})
    probe_key = "probe_gflops" if device == "cpu" else "gflops"
    result["bf16_emulated"] = bf16_is_emulated(result[f"fp32_{probe_key}"], result[f"bf16_{probe_key}"])
    return result


def best_peak(measurements: list[dict]) -> dict:
    """The best of the peak measurements (taken before and after the rows: other work on the machine can only
    lower a measurement), with every measurement kept."""
    best = dict(measurements[0])
    for key in ("fp32_gflops", "bf16_gflops"):
        best[key] = max(m[key] for m in measurements)
    best["measurements"] = measurements
    return best


# ------------------------------------------------------------------------------------------------- FLOPs, MFU

def train_flops_per_token(non_embedding_parameters: int, layers: int, hidden: int, tokens_per_pair: float) -> float:
    """Forward + backward FLOPs per real token: 6N for the weights, 12LHS for attention scores and mixing."""
    return 6 * non_embedding_parameters + 12 * layers * hidden * tokens_per_pair


def forward_flops_per_token(non_embedding_parameters: int, layers: int, hidden: int, tokens_per_pair: float) -> float:
    return 2 * non_embedding_parameters + 4 * layers * hidden * tokens_per_pair


def mfu(tokens_per_second: float, flops_per_token: float, peak_gflops: float) -> float:
    """Model FLOP utilisation: the useful FLOP/s over the peak FLOP/s."""
    return tokens_per_second * flops_per_token / (peak_gflops * 1e9)


def model_stats(model_dir, splits: dict, max_length: int) -> dict:
    """Parameter counts, shape, mean real tokens per pair of each split ({"train": path, "dev": ..., "predict":
    ...}), and FLOPs per real token (train for "train", forward for the others)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from bench.common import read_jsonl

    hf_logging.set_verbosity_error()  # the fresh head's "newly initialized" report is expected here
    hf_logging.disable_progress_bar()
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), num_labels=2)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    total = sum(p.numel() for p in model.parameters())
    embedding = sum(p.numel() for n, p in model.named_parameters() if ".embeddings." in n)
    config = model.config
    stats = {"parameters": total, "non_embedding_parameters": total - embedding,
             "layers": config.num_hidden_layers, "hidden_size": config.hidden_size,
             "heads": config.num_attention_heads, "intermediate_size": config.intermediate_size,
             "vocab_size": config.vocab_size}
    for split, path in splits.items():
        rows = read_jsonl(path)
        ids = tokenizer([r["sentence1"] for r in rows], [r["sentence2"] for r in rows], truncation=True,
                        max_length=max_length)["input_ids"]
        stats[f"{split}_mean_tokens_per_pair"] = sum(map(len, ids)) / len(ids)
    shape = stats["non_embedding_parameters"], stats["layers"], stats["hidden_size"]
    stats["train_flops_per_token"] = train_flops_per_token(*shape, stats["train_mean_tokens_per_pair"])
    for split in splits:
        if split != "train":
            stats[f"{split}_forward_flops_per_token"] = forward_flops_per_token(
                *shape, stats[f"{split}_mean_tokens_per_pair"])
    return stats


def normalise(raw: dict) -> dict:
    """Rates from a worker's counts and seconds (the tool's results already carry rates)."""
    out = dict(raw)
    if "train_samples_per_second" not in out:
        seconds = raw["train_seconds"]
        out["train_samples_per_second"] = raw["train_samples"] / seconds
        out["train_tokens_per_second"] = raw["train_real_tokens"] / seconds
        out["train_padding_fraction"] = 1 - raw["train_real_tokens"] / raw["train_all_tokens"]
    for phase in ("eval", "predict"):
        if f"{phase}_samples_per_second" not in out and raw.get(f"{phase}_seconds"):
            out[f"{phase}_samples_per_second"] = raw[f"{phase}_samples"] / raw[f"{phase}_seconds"]
    return out


def add_mfu(measure: dict, stats: dict, peak_gflops: float) -> dict:
    """MFU of train, eval and predict against the matmul peak of the row's precision (on the row's device)."""
    if measure.get("train_tokens_per_second") is not None:
        measure["train_mfu"] = mfu(measure["train_tokens_per_second"], stats["train_flops_per_token"], peak_gflops)
    for phase, split in (("eval", "dev"), ("predict", "predict")):
        rate = measure.get(f"{phase}_samples_per_second")
        if rate is not None:
            tokens = rate * stats[f"{split}_mean_tokens_per_pair"]
            measure[f"{phase}_mfu"] = mfu(tokens, stats[f"{split}_forward_flops_per_token"], peak_gflops)
    return measure


def ceilings(stats: dict, peak_gflops: float, tutorial: dict | None) -> dict:
    """Samples/s at 100% of `peak_gflops` for train, eval and predict (useful FLOPs only: real tokens), and those
    over the tutorial row's measured rates (`tutorial`: its medians, same precision): no implementation of the
    same computation can beat them."""
    peak = peak_gflops * 1e9
    out = {"train": peak / (stats["train_flops_per_token"] * stats["train_mean_tokens_per_pair"])}
    for phase, split in (("eval", "dev"), ("predict", "predict")):
        out[phase] = peak / (stats[f"{split}_forward_flops_per_token"] * stats[f"{split}_mean_tokens_per_pair"])
    for phase in ("train", "eval", "predict"):
        measured = (tutorial or {}).get(f"{phase}_samples_per_second")
        out[f"{phase}_vs_tutorial"] = out[phase] / measured if measured else None
    return out


@contextlib.contextmanager
def timed(device: str, into: dict, key: str):
    """Time the block on `device` (synchronised at both ends on a GPU); store the seconds in into[key]."""
    synchronize(device)
    start = time.perf_counter()
    yield
    synchronize(device)
    into[key] = time.perf_counter() - start
