"""SGLang's own loader code on an FP8 checkpoint, on the CPU: ``fp8vl verify --sglang``.

Run in SGLang's interpreter: ``python -m fp8vl.check.engines.sglang_check DIR --json OUT``. Steps, as
SGLang's ``DefaultModelLoader.load_model`` takes them (written against SGLang 0.5.23):
``ServerArgs(model_path=DIR, device="cpu")`` -> ``ModelConfig.from_server_args``; a one-process gloo
group; ``_get_quantization_config`` (the quant config with the model class's packed modules) and
``_initialize_model`` on the CPU; each layer's ``quant_method``; then the loader's weights iterator
into the model's own ``load_weights``, every tensor followed by ``common.Tracker``.

Placeholders for what only hardware decides (no name or quantize/skip decision depends on them):
- the compiled rotary-embedding kernel: SGLang imports it from its CUDA kernel package at build time;
  the rotary layer is given its PyTorch path (it holds no checkpoint weights).
- compressed-tensors' device-capability check: on a CPU there is no capability to compare; it is
  told the hardware fits (the layer schemes it picks depend only on config.json).
"""

from __future__ import annotations

import tempfile
import traceback
from pathlib import Path

from .common import Result, Tracker, arguments, checkpoint_dtypes, judge


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    frames = [f for f in traceback.extract_tb(e.__traceback__) if "/sglang/srt/" in f.filename]
    where = f" (in {frames[-1].filename.rsplit('/', 1)[-1]}: {frames[-1].name})" if frames else ""
    return f"{type(e).__name__}: {text[0] if text else ''}{where}"


def _setup(path: Path):
    from sglang.srt.configs.load_config import LoadConfig
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.distributed import init_distributed_environment, initialize_model_parallel
    from sglang.srt.server_args import ServerArgs

    args = ServerArgs(model_path=str(path), device="cpu", disable_cuda_graph=True)
    # What SGLang's launcher does for each scheduler process: publish the server args and this
    # process's place (rank 0 of one).
    from sglang.srt.runtime_context import SpawnRanks, publish

    publish(args, role="scheduler", ranks=SpawnRanks(world_rank=0))
    # Placeholder: rotary layers take their PyTorch path (a CUDA build without a GPU otherwise
    # imports a compiled rotary kernel from vLLM, which is not installed beside SGLang).
    import sglang.srt.layers.rotary_embedding.base as rotary

    rotary._is_cpu = True
    # Placeholder: compressed-tensors asks torch.cuda for the compute capability to pick a scheme;
    # answer "fits" (an FP8 GPU's choice, W8A8). Either scheme quantizes the same layers.
    from sglang.srt.layers.quantization.compressed_tensors.compressed_tensors import CompressedTensorsConfig

    CompressedTensorsConfig._check_scheme_supported = lambda self, min_capability, error=True: True
    model_config = ModelConfig.from_server_args(args)
    load_config = LoadConfig(load_format=args.load_format, download_dir=args.download_dir)
    init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                 distributed_init_method=f"file://{tempfile.mkdtemp()}/rendezvous")
    initialize_model_parallel()
    return model_config, load_config


def run(path: Path, res: Result) -> None:
    import torch
    from sglang.srt.model_loader.loader import (DefaultModelLoader, _get_quantization_config,
                                                _initialize_model, set_default_torch_dtype)
    from sglang.srt.model_loader.weight_utils import default_weight_loader

    try:
        model_config, load_config = _setup(path)
    except Exception as e:
        res.add("error", "sglang config", f"SGLang refuses the checkpoint's config: {_first_line(e)}")
        return
    try:
        quant_config = _get_quantization_config(model_config, load_config)
        with set_default_torch_dtype(model_config.dtype), torch.device("cpu"):
            model = _initialize_model(model_config, load_config, quant_config)
    except Exception as e:
        res.add("error", "sglang build", f"SGLang fails to build the model: {_first_line(e)}")
        return
    res.add("ok", "sglang config", f"{type(model).__name__} with {type(quant_config).__name__}")
    loader = DefaultModelLoader(load_config)
    tracker = Tracker(model, default_weight_loader)
    own = model.load_weights
    model.load_weights = lambda weights: own(tracker.feed(weights))
    try:
        with set_default_torch_dtype(model_config.dtype):
            loader.load_weights_only(model, loader._get_all_weights(model_config, model), torch.device("cpu"))
    except Exception as e:
        where = f" (loading {tracker.current})" if tracker.current else ""
        res.add("error", "sglang load", f"SGLang fails to load the model: {_first_line(e)}{where}")
        return
    methods = {n: getattr(m, "quant_method", None) for n, m in model.named_modules()}
    judge(res, "sglang", checkpoint_dtypes(path), tracker, methods,
          lambda n: n.endswith((".k_scale", ".v_scale", ".q_scale", ".prob_scale")))


def main() -> None:
    args = arguments(__doc__.splitlines()[0])
    import sglang

    res = Result("sglang", sglang.__version__)
    try:
        run(Path(args.checkpoint), res)
    except Exception as e:
        res.add("error", "sglang", f"check crashed: {_first_line(e)}")
    res.write(args.json)


if __name__ == "__main__":
    main()
