"""The benchmark harness: what a bench module declares, and how one measurement is taken.

A bench module (`benchmarks/bench_<op>.py`) defines
    OP: str                                   the op's name stem
    MODES: tuple[str, ...]                    any of "forward", "backward", "forward+backward"
    cases(quick: bool) -> list[Case]          shapes taken from real models, named after them
    providers(device) -> list[Provider]       reference (eager), reference under torch.compile,
                                              mmfast, peers where installed

All providers of one case, dtype and mode are measured side by side in the same process, on
the same fresh random inputs, in interleaved rounds:
  * CPU time: torch.utils.benchmark's blocked_autorange per round; median and 20/80 quantiles
    of all samples (warm-up excluded).
  * GPU time: triton.testing.do_bench per round, likewise.
  * GEMM peak (ops with a FLOP count): a square GEMM of the dtype timed in the same rounds,
    whose rate the op's GFLOP/s is given as a percentage of.
  * Peak memory: CPU, the process's peak RSS above its level just before the call (the peak is
    reset through /proc/self/clear_refs; for this call glibc is told to return every large
    block to the OS, so freed memory of earlier runs cannot hide an allocation; timing runs
    reuse freed blocks, as a loop of the same calls does); GPU, max_memory_allocated above
    the inputs.
  * Live memory (CPU): the peak of glibc's in-use bytes (mallinfo2: heap chunks in use plus
    mapped blocks) above their level before the call, sampled by a thread about every 0.1 ms.
    It counts what the call holds, not what the OS gave the process, so it does not move
    with what ran before in the process as the RSS peak does (by 10-20 MiB at the projector's
    shapes); a block held for less than a sample interval can be missed.
  * Saved-for-backward bytes (modes with a backward): the bytes of every distinct tensor
    storage that autograd saves during the forward, inputs excluded.
"""

import ctypes
import gc
import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

MODES = ("forward", "backward", "forward+backward")
DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class Case:
    """One benchmark shape.

    name:        the model it is taken from, e.g. "LLaVA-1.5-7B".
    params:      the sizes shown in the table.
    make_inputs: (device, dtype, requires_grad) -> dict of keyword inputs; fresh random values.
                 requires_grad says whether a backward is measured; the case decides which
                 inputs get gradients (e.g. a frozen x).
    flops:       floating-point operations of one forward (0: not reported).
    bytes:       fewest bytes one forward must move (0: not reported), or a function of the
                 torch dtype giving them.
    backward_flops: the same for one backward (default 2 * flops).
    dtypes:      dtypes this case is measured in.
    """

    name: str
    params: dict
    make_inputs: Callable[[torch.device, torch.dtype, bool], dict]
    flops: float = 0.0
    bytes: float | Callable[[torch.dtype], float] = 0.0
    backward_flops: float | None = None
    dtypes: tuple = ("float32", "bfloat16")


@dataclass
class Provider:
    """One way to compute the op.

    fn:   inputs (the dict of Case.make_inputs) -> output tensor or tuple of tensors.
    kind: "eager" (the reference in eager PyTorch: the baseline), "compile" (the reference
          under torch.compile), "mmfast", or "peer".
    implementation: () -> name of what actually ran (mmfast: the kernel the chooser picked);
          called after the measurement, so it reflects the last call.
    supports: (case, dtype, mode) -> reason it cannot run, or None.
    """

    name: str
    fn: Callable[[dict], Any]
    kind: str
    implementation: Callable[[], str] | None = None
    supports: Callable[[Case, str, str], str | None] | None = None


@dataclass
class Measurement:
    op: str
    case: str
    params: dict
    dtype: str
    mode: str
    provider: str
    kind: str
    implementation: str
    device: str
    time_ms: float | None = None
    time_q20_ms: float | None = None
    time_q80_ms: float | None = None
    gflops: float | None = None
    gbps: float | None = None
    peak_mib: float | None = None
    live_mib: float | None = None
    saved_mib: float | None = None
    # The GEMM peak (GFLOP/s) timed in the same interleaved rounds as this measurement, the
    # ceiling its GFLOP/s is compared with (gemm_peak_gflops); None for ops without a FLOP count.
    gemm_peak_gflops: float | None = None
    error: str | None = None
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# memory

_libc = None


def _glibc():
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL("libc.so.6")
        except OSError:
            _libc = False
    return _libc


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def _malloc_fresh_blocks(fresh: bool) -> None:
    """fresh: every block of 128 KiB or more is mmapped and goes back to the OS when freed, so
    a peak-memory measurement sees every large allocation. Otherwise (timing) blocks below
    32 MiB are reused from the heap, as glibc's adaptive thresholds settle to in a loop that
    repeats the same calls: a provider's time then does not include first-touch page faults
    that a training or serving loop would not pay either."""
    libc = _glibc()
    if libc:
        libc.mallopt(_M_MMAP_THRESHOLD, 128 * 1024 if fresh else 32 * 2**20)
        libc.mallopt(_M_TRIM_THRESHOLD, 128 * 1024 if fresh else 64 * 2**20)


def _rss_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def _reset_cpu_peak() -> int:
    gc.collect()
    libc = _glibc()
    if libc:
        libc.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _rss_kib("VmRSS")


def cpu_peak_mib(run: Callable[[], Any]) -> float:
    """Peak resident memory (MiB) that `run` adds above the process's level before it."""
    _malloc_fresh_blocks(True)
    try:
        base = _reset_cpu_peak()
        out = run()
        peak = _rss_kib("VmHWM")
        del out
    finally:
        _malloc_fresh_blocks(False)
    return max(peak - base, 0) / 1024


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def _live_bytes_fn() -> Callable[[], int] | None:
    """glibc's bytes in use (heap chunks + mapped blocks), or None without mallinfo2 (glibc
    before 2.33, other C libraries)."""
    libc = _glibc()
    mallinfo2 = getattr(libc, "mallinfo2", None) if libc else None
    if mallinfo2 is None:
        return None
    mallinfo2.restype = _MallInfo2
    mallinfo2.argtypes = []

    def live() -> int:
        m = mallinfo2()
        return m.uordblks + m.hblkhd
    return live


def cpu_live_peak_mib(run: Callable[[], Any]) -> float | None:
    """Peak of the bytes `run` holds (MiB above the level before it; its result included),
    sampled every ~0.05 ms by a thread (torch's ops run without the GIL); None where glibc
    cannot tell. A block allocated and freed between two samples can be missed."""
    live = _live_bytes_fn()
    if live is None:
        return None
    gc.collect()
    base = live()
    sampled = [base]  # written by the sampler only: a max shared with this thread loses updates
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            sampled[0] = max(sampled[0], live())
            time.sleep(5e-5)

    # Python code between torch's ops holds the GIL for up to the switch interval (5 ms);
    # a short one lets the sampler in between ops too.
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        out = run()
        with_result = live()
        del out
    finally:
        stop.set()
        sampler.join()
        sys.setswitchinterval(interval)
    return (max(sampled[0], with_result) - base) / 2**20


def gpu_peak_mib(run: Callable[[], Any]) -> float:
    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = run()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del out
    return (peak - base) / 2**20


def saved_tensor_mib(forward: Callable[[], Any], inputs: dict) -> float:
    """MiB of distinct storages autograd saves during `forward`, not counting the inputs."""
    input_storages = {t.untyped_storage().data_ptr() for t in _tensors(inputs)}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in input_storages:
            seen[ptr] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out
    return sum(seen.values()) / 2**20


def _tensors(obj):
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


# ---------------------------------------------------------------------------------------------
# timing


def _cpu_samples(fn: Callable[[], Any], budget_s: float) -> list[float]:
    """Per-call times (ms) of fn over about budget_s, from blocked_autorange."""
    from torch.utils import benchmark

    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return [t * 1e3 for t in timer.blocked_autorange(min_run_time=budget_s).times]


def _samples(fn: Callable[[], Any], device: torch.device, budget_s: float) -> list[float]:
    return (_gpu_samples if device.type == "cuda" else _cpu_samples)(fn, budget_s)


def _gpu_samples(fn: Callable[[], Any], budget_s: float) -> list[float]:
    import triton.testing

    return list(triton.testing.do_bench(fn, warmup=5, rep=max(1, int(budget_s * 1e3)),
                                        return_mode="all"))


def _backward_samples(prepare, run, device, budget_s: float) -> list[float]:
    """Backward alone: each sample runs a forward (untimed), then the timed backward."""
    import time

    samples = []
    deadline = time.perf_counter() + budget_s
    while not samples or time.perf_counter() < deadline:
        prepare()
        if device.type == "cuda":
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            run()
            samples.append((time.perf_counter() - t0) * 1e3)
    return samples


def _outputs(out) -> list[torch.Tensor]:
    return [t for t in _tensors(out) if t.requires_grad]


@dataclass
class _Runner:
    provider: Provider
    m: Measurement
    run: Callable[[], Any] | None = None
    prepare: Callable[[], Any] | None = None
    samples: list = field(default_factory=list)


def _make_runner(runner: _Runner, inputs: dict, mode: str) -> None:
    fn = runner.provider.fn
    if mode == "forward":
        def run():
            with torch.no_grad():
                return fn(inputs)
        runner.run = run
        return
    first = _outputs(fn(inputs))
    if not first:
        raise RuntimeError("no output requires grad")
    grads = [torch.randn_like(t) for t in first]
    del first
    if mode == "backward":
        state = {}

        def prepare():
            state["out"] = _outputs(fn(inputs))

        def run():
            torch.autograd.backward(state.pop("out"), grads)
        runner.prepare, runner.run = prepare, run
    else:
        def run():
            out = _outputs(fn(inputs))
            torch.autograd.backward(out, grads)
            return out
        runner.run = run


def _fail(runner: _Runner, e: Exception) -> None:
    runner.m.error = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    runner.run = None


# Rounds of a group: at least this many, and no new one after _GROUP_SECONDS.
_MIN_ROUNDS = 3
_GROUP_SECONDS = 60.0


def measure_group(op: str, case: Case, providers: list[Provider], dtype: str, mode: str,
                  device: torch.device, quick: bool = False) -> list[Measurement]:
    """Measure every provider on one (case, dtype, mode), on the same inputs.

    Providers are timed in interleaved rounds (A B C A B C ...) and each one's samples pooled,
    so a change in the machine's load during the run hits all of them alike: the ratios stay
    fair on a shared, noisy machine."""
    _malloc_fresh_blocks(False)
    torch.manual_seed(0)
    inputs = case.make_inputs(device, DTYPE_NAMES[dtype], mode != "forward")
    runners = []
    for p in providers:
        r = _Runner(p, Measurement(op, case.name, case.params, dtype, mode, p.name, p.kind,
                                   p.name, str(device.type)))
        runners.append(r)
        reason = p.supports(case, dtype, mode) if p.supports else None
        if reason:
            r.m.error = f"skipped: {reason}"
            continue
        try:
            _make_runner(r, inputs, mode)
            if r.prepare:
                r.prepare()
            r.run()  # warm-up (and compilation), excluded
        except Exception as e:  # a provider that fails is reported in the table, not fatal
            _fail(r, e)
    # A GEMM-bound op's rate is compared with the machine's GEMM peak timed in the same rounds:
    # on a shared CPU the rate drifts by up to 2x within minutes, and a peak measured once at
    # the start of a run would compare a slow phase's op with a fast phase's peak.
    peak = _peak_gemm(device, dtype, quick) if case.flops else None
    peak_samples = []
    rounds, budget = (3, 0.05) if quick else (7, 0.15)
    start = time.perf_counter()
    for done in range(rounds):
        # Providers that take many seconds a call (bfloat16 eager on a CPU whose ATen GEMM in
        # that dtype is a scalar loop: ~50 s for SigLIP's training step on a Zen 3) end the
        # group after its minimum of rounds once it has run for a while.
        if done >= _MIN_ROUNDS and time.perf_counter() - start > _GROUP_SECONDS:
            break
        for r in runners:
            if r.run is None:
                continue
            try:
                if mode == "backward":
                    r.samples += _backward_samples(r.prepare, r.run, device, budget)
                else:
                    r.samples += _samples(r.run, device, budget)
            except Exception as e:
                _fail(r, e)
        if peak is not None:
            peak_samples += _samples(peak.run, device, budget)
    peak_gflops = (peak.flops / (statistics.median(peak_samples) * 1e-3) / 1e9
                   if peak_samples else None)
    for r in runners:
        if r.run is None:
            continue
        try:
            _finish(r, case, inputs, dtype, mode, device)
            if r.m.gflops is not None:
                r.m.gemm_peak_gflops = peak_gflops
        except Exception as e:
            _fail(r, e)
    return [r.m for r in runners]


def _finish(r: _Runner, case: Case, inputs: dict, dtype: str, mode: str, device) -> None:
    m = r.m
    times = sorted(r.samples)
    q = lambda p: times[min(len(times) - 1, int(p * len(times)))]  # noqa: E731
    m.time_ms, m.time_q20_ms, m.time_q80_ms = q(0.5), q(0.2), q(0.8)
    if r.prepare:
        r.prepare()
    m.peak_mib = (gpu_peak_mib if device.type == "cuda" else cpu_peak_mib)(r.run)
    if device.type == "cpu":  # on GPU peak_mib already counts allocated bytes
        m.live_mib = cpu_live_peak_mib(r.run)
    if mode != "forward":
        m.saved_mib = saved_tensor_mib(lambda: r.provider.fn(inputs), inputs)
    flops = {"forward": case.flops,
             "backward": case.backward_flops if case.backward_flops is not None else 2 * case.flops}
    flops["forward+backward"] = flops["forward"] + flops["backward"]
    if flops[mode]:
        m.gflops = flops[mode] / (m.time_ms * 1e-3) / 1e9
    nbytes = case.bytes(DTYPE_NAMES[dtype]) if callable(case.bytes) else case.bytes
    if nbytes and mode == "forward":
        m.gbps = nbytes / (m.time_ms * 1e-3) / 1e9
    if r.provider.implementation is not None:
        m.implementation = r.provider.implementation()


@dataclass
class _PeakGemm:
    gflops: float                 # measured when first asked for
    run: Callable[[], Any]        # the faster of the square GEMMs below
    flops: float


_PEAK_GEMMS: dict = {}


def _peak_gemm(device: torch.device, dtype: str, quick: bool) -> _PeakGemm:
    key = (device.type, dtype)
    if key not in _PEAK_GEMMS:
        n = 4096 if device.type == "cuda" else (1024 if quick else 2048)
        a = torch.randn(n, n, device=device, dtype=DTYPE_NAMES[dtype])
        b = torch.randn(n, n, device=device, dtype=DTYPE_NAMES[dtype])
        runs = [lambda: torch.mm(a, b)]
        if device.type == "cpu" and hasattr(torch.ops.mkldnn, "_linear_pointwise"):
            runs.append(lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], ""))
        if device.type == "cpu" and dtype in ("bfloat16", "float16"):
            # where ATen's GEMM in this dtype is a scalar loop (no oneDNN kernels for it), the
            # fastest way to multiply these matrices is in float32: widened, multiplied, rounded
            runs.append(lambda: torch.mm(a.float(), b.float()).to(a.dtype))
        best = None
        for run in runs:
            try:
                run()
            except RuntimeError:  # oneDNN has no kernel in this dtype here (bf16 without AVX-512)
                continue
            ms = statistics.median(_samples(run, device, 0.3 if quick else 1.0))
            rate = 2 * n**3 / (ms * 1e-3) / 1e9
            if best is None or rate > best.gflops:
                best = _PeakGemm(rate, run, 2 * n**3)
        _PEAK_GEMMS[key] = best
    return _PEAK_GEMMS[key]


def gemm_peak_gflops(device: torch.device, dtype: str, quick: bool = False) -> float:
    """This machine's measured GEMM rate for a dtype, the ceiling the GEMM-bound ops are compared
    with: a large square torch.mm, and on CPU also oneDNN's linear where torch has it (in
    float32 torch.mm calls MKL, which some CPUs run well below oneDNN) and, in bfloat16 and
    float16, a float32 torch.mm on widened operands (CPUs without kernels in those dtypes);
    the fastest.
    This is the rate at the start of a run; measure_group times that GEMM again in each
    group's rounds (Measurement.gemm_peak_gflops), since a shared machine's rate drifts."""
    return _peak_gemm(device, dtype, quick).gflops


def mmfast_implementation(op: str, device: torch.device) -> Callable[[], str]:
    """Names what mmfast ran for `op`: the CPU ISA build, or the CUDA implementation chosen."""
    import mmfast

    def name():
        if device.type == "cuda":
            return f"mmfast[{mmfast.last_choice(op) or '?'}]"
        return f"mmfast[cpu-{mmfast.cpu_isa()}]"

    return name


def compiled(fn: Callable[[dict], Any]) -> Callable[[dict], Any]:
    """The reference under torch.compile (dynamic=False: each shape gets its best graph)."""
    return torch.compile(fn, dynamic=False)


def machine_info(device: torch.device) -> dict:
    import platform
    import subprocess

    info = {"python": platform.python_version(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "cpu": _cpu_name(), "device": str(device)}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        import mmfast
        info["mmfast_cpu_isa"] = mmfast.cpu_isa()
        info["mmfast_cpu_bf16_gemm"] = mmfast.cpu_bf16_gemm()
        info["mmfast_cpu_f16_gemm"] = mmfast.cpu_f16_gemm()
        info["mmfast_cpu_f32_gemm"] = mmfast.cpu_f32_gemm()
        info["mmfast_cpu_xattn_bf16"] = mmfast.cpu_xattn_bf16()
        info["mmfast_cpu_merge_gemm"] = mmfast.cpu_merge_gemm()
    except ImportError:
        pass
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                            text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        if dirty:
            info["git_commit"] += "-dirty"
    except (OSError, subprocess.CalledProcessError):
        info["git_commit"] = "unknown"
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor()
