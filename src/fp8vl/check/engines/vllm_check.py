"""vLLM's own loader code on an FP8 checkpoint, on the CPU: ``fp8vl verify --vllm``.

Run in vLLM's interpreter: ``python -m fp8vl.check.engines.vllm_check DIR --json OUT [--tp 1,2,4,8]``.
Steps, as ``vllm serve`` takes them (written against vLLM 0.33.0):

1. ``EngineArgs(model=DIR).create_engine_config()``: vLLM reads config.json and picks its
   quantization config class (``Fp8Config`` or ``CompressedTensorsConfig``).
2. A one-process gloo group (``init_distributed_environment`` + ``initialize_model_parallel``).
3. vLLM's model loader builds the model class on the CPU (``create_model``: the loader maps the
   not-converted list to vLLM's names and asks the quant config for each layer's ``quant_method``),
   then runs its own ``load_weights`` on the checkpoint; ``common.Tracker`` follows every tensor.
4. For each TP size N: the same build and load for rank 0 and rank N-1.

Placeholders for what only hardware decides (none of them touches a name or a quantize/skip decision):
- ``VLLM_TARGET_DEVICE=cpu``: a CUDA build of vLLM on a machine without GPU selects no platform.
- the FP8 GEMM kernel chooser (``choose_scaled_mm_linear_kernel``) returns a kernel that does nothing:
  on a CPU it wants AMX tiles, and the kernel only runs in forward passes, which are never made.
- TP N, rank r: the one-process TP group reports ``world_size`` N and ``rank_in_group`` r. Building
  and loading only read these to size and slice each rank's shard; they never communicate.
"""

from __future__ import annotations

import os
import tempfile
import traceback
from pathlib import Path

from .common import Result, Tracker, arguments, checkpoint_dtypes, judge

KV_CACHE_SCALES = (".k_scale", ".v_scale", ".q_scale", ".prob_scale")


def _first_line(e: BaseException) -> str:
    """``Type: first line of the message (in the innermost model or layer file)``."""
    text = str(e).strip().splitlines()
    frames = [f for f in traceback.extract_tb(e.__traceback__) if "/model_executor/" in f.filename]
    where = f" (in {frames[-1].filename.rsplit('/', 1)[-1]}: {frames[-1].name})" if frames else ""
    return f"{type(e).__name__}: {text[0] if text else ''}{where}"


class _NoKernel:
    """Placeholder FP8 GEMM kernel (see the module docstring)."""

    def __init__(self, *args, **kwargs):
        pass

    def input_quant_key(self):      # asked at build by compressed-tensors' scheme: "quantizes its own input"
        return None


def _setup(path: Path):
    """vLLM's engine config for ``path`` and a one-process distributed group."""
    import vllm.model_executor.kernels.linear as linear_kernels
    from vllm.config import set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.engine.arg_utils import EngineArgs

    linear_kernels.choose_scaled_mm_linear_kernel = lambda *a, **k: _NoKernel
    cfg = EngineArgs(model=str(path), enforce_eager=True, max_model_len=512).create_engine_config()
    with set_current_vllm_config(cfg):
        init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                     distributed_init_method=f"file://{tempfile.mkdtemp()}/rendezvous")
        initialize_model_parallel(1, 1)
    return cfg


def build_and_load(cfg, tp: int, rank: int):
    """Build the model for TP rank ``rank`` of ``tp`` and load the checkpoint into it.

    Returns (model, tracker, phase, error): phase "build" or "load" names where an error happened."""
    import torch
    from vllm.config import set_current_vllm_config
    from vllm.distributed import parallel_state
    from vllm.model_executor.model_loader import get_model_loader
    from vllm.model_executor.model_loader.weight_utils import default_weight_loader
    from vllm.utils.torch_utils import set_default_torch_dtype

    group = parallel_state.get_tp_group()
    group.world_size, group.rank_in_group = tp, rank
    cfg.parallel_config.tensor_parallel_size = tp
    cfg.compilation_config.static_forward_context.clear()   # attention layers register here by name
    loader = get_model_loader(cfg.load_config)
    with set_current_vllm_config(cfg), set_default_torch_dtype(cfg.model_config.dtype), torch.device("cpu"):
        try:
            model = loader.create_model(vllm_config=cfg, model_config=cfg.model_config)
        except Exception as e:
            return None, None, "build", _first_line(e)
        tracker = Tracker(model, default_weight_loader)
        own = model.load_weights
        model.load_weights = lambda weights: own(tracker.feed(weights))
        try:
            loader.load_weights(model, cfg.model_config)
        except Exception as e:
            where = f" (loading {tracker.current})" if tracker.current else ""
            return model, tracker, "load", _first_line(e) + where
    return model, tracker, None, None


def methods(model) -> dict[str, object]:
    return {n: getattr(m, "quant_method", None) for n, m in model.named_modules()}


def run(path: Path, res: Result, tp_sizes: tuple[int, ...]) -> None:
    try:
        cfg = _setup(path)
    except Exception as e:
        res.add("error", "vllm config", f"vLLM refuses the checkpoint's config: {_first_line(e)}")
        return
    qc = type(cfg.quant_config).__name__ if cfg.quant_config is not None else "no quantization"
    res.add("ok", "vllm config", f"{cfg.model_config.architecture} with {qc}")
    dtypes = checkpoint_dtypes(path)
    model, tracker, phase, error = build_and_load(cfg, 1, 0)
    if error:
        res.add("error", f"vllm {phase}", f"vLLM fails to {phase} the model: {error}")
        return
    judge(res, "vllm", dtypes, tracker, methods(model), lambda n: n.endswith(KV_CACHE_SCALES))
    del model, tracker
    for tp in tp_sizes:
        res.tp[tp] = {"ok": True, "phase": None, "error": None}
        for rank in sorted({0, tp - 1}):
            _, _, phase, error = build_and_load(cfg, tp, rank)
            if error:
                res.tp[tp] = {"ok": False, "phase": phase, "error": f"rank {rank}: {error}"}
                break
    if tp_sizes:
        ok = [str(t) for t, v in res.tp.items() if v["ok"]]
        bad = {t: v for t, v in res.tp.items() if not v["ok"]}
        line = f"builds and loads at TP {', '.join(ok) or 'none'}"
        if bad:
            t, v = min(bad.items())
            line += f"; TP {t} fails at {v['phase']} ({v['error']})"
        res.add("ok", "vllm tp", line)


def main() -> None:
    args = arguments(__doc__.splitlines()[0])
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    import vllm

    res = Result("vllm", vllm.__version__)
    try:
        run(Path(args.checkpoint), res, tuple(int(t) for t in args.tp.split(",") if t))
    except Exception as e:  # a crash of the check itself: say where
        res.add("error", "vllm", f"check crashed: {_first_line(e)} at "
                                 f"{traceback.extract_tb(e.__traceback__)[-1].filename.split('site-packages/')[-1]}")
    res.write(args.json)


if __name__ == "__main__":
    main()
