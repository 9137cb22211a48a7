"""Engine-independent half of the real-loader checks: read the checkpoint, follow each tensor into the
engine's model, and judge the engine's per-layer decisions against it.

Runs inside the engine's interpreter (torch and safetensors only, no fp8vl dependency beyond this
package). The engine glue (vllm_check.py, sglang_check.py) builds the model with the engine's own
code; this module wraps every parameter's ``weight_loader`` so that each call records which
checkpoint tensor went into which parameter, then compares:

- an FP8 checkpoint weight must land in a layer the engine quantizes, a higher-precision linear
  weight in a layer it leaves unquantized (else the engine casts BF16 into FP8 silently);
- every checkpoint tensor must be consumed, every parameter written (an unwritten FP8 scale is
  garbage at run time);
- no FP8 tensor goes into a non-FP8 parameter or the other way round.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

FP8 = {torch.float8_e4m3fn, torch.float8_e5m2}


@dataclass
class Result:
    engine: str
    version: str | None
    checks: list[dict] = field(default_factory=list)
    layers: dict = field(default_factory=dict)       # counts: quantized / unquantized linears, tensors
    tp: dict = field(default_factory=dict)           # vLLM: {tp: {"ok": bool, "phase": str, "error": str}}

    def add(self, level: str, name: str, message: str) -> None:
        self.checks.append({"level": level, "name": name, "message": message})

    def write(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2))


def arguments(description: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("checkpoint")
    p.add_argument("--json", required=True, help="write the result here")
    p.add_argument("--tp", default="", help="tensor-parallel sizes to build and load, e.g. 1,2,4,8")
    return p.parse_args()


def checkpoint_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return [path / f for f in dict.fromkeys(json.loads(index.read_text())["weight_map"].values())]
    return sorted(path.glob("*.safetensors"))


def checkpoint_dtypes(path: Path) -> dict[str, torch.dtype]:
    from safetensors import safe_open

    out = {}
    for f in checkpoint_files(path):
        with safe_open(f, "pt") as s:
            for n in s.keys():
                out[n] = s.get_slice(n).get_dtype()
    names = {"F8_E4M3": torch.float8_e4m3fn, "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
    return {n: names.get(d, d) for n, d in out.items()}


def quantized_method(method: object | None) -> bool | None:
    """True for an FP8 layer, False for an unquantized one, None for a module without a method."""
    if method is None:
        return None
    return not type(method).__name__.startswith("Unquantized")


@dataclass
class Record:
    tensor: str         # checkpoint name
    param: str          # engine parameter it went into
    dtype: str          # checkpoint dtype
    param_dtype: str


class Tracker:
    """Follows checkpoint tensors into the engine's parameters by wrapping their ``weight_loader``."""

    def __init__(self, model: torch.nn.Module, default_loader: Callable):
        self.current: str | None = None
        self.records: list[Record] = []
        self.written: set[str] = set()
        self.model = model
        for name, p in model.named_parameters():
            self._wrap(name, p, default_loader)

    def _wrap(self, name: str, p: torch.nn.Parameter, default_loader: Callable) -> None:
        # vLLM's BasevLLMParameter keeps its loader in ``_weight_loader`` behind a read-only property;
        # plain parameters carry ``weight_loader`` as an attribute, or none (the default is used).
        attr = "_weight_loader" if hasattr(p, "_weight_loader") else "weight_loader"
        inner = getattr(p, attr, None) or default_loader

        def loader(*args, **kwargs):
            # Engines call loaders positionally or by keyword (vLLM's MoE: param=, loaded_weight=).
            param = args[0] if args else kwargs["param"]
            loaded = args[1] if len(args) > 1 else kwargs["loaded_weight"]
            done = inner(*args, **kwargs)
            if done is not False:       # MoE loaders return False for an expert this rank does not hold
                if self.current is not None:
                    self.records.append(Record(self.current, name, str(loaded.dtype).replace("torch.", ""),
                                               str(param.dtype).replace("torch.", "")))
                self.written.add(name)
            return done
        setattr(p, attr, loader)

    def feed(self, tensors: Iterator[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """The checkpoint's tensors, noting which one the engine is consuming."""
        for name, t in tensors:
            self.current = name
            yield name, t
        self.current = None


def judge(result: Result, engine: str, dtypes: dict[str, torch.dtype], tracker: Tracker,
          methods: dict[str, object], skip_params: Callable[[str], bool] = lambda n: False) -> None:
    """The checks of the module docstring, added to ``result`` (one error per problem kind, naming
    up to 4 tensors, or 16 layers in the engine's names, and the count)."""
    fp8_in_bf16, bf16_in_fp8, crossing = [], [], []
    by_tensor: dict[str, list[Record]] = {}
    for r in tracker.records:
        by_tensor.setdefault(r.tensor, []).append(r)
    quant_layers, plain_layers = set(), set()
    for name, dt in dtypes.items():
        recs = by_tensor.get(name, [])
        for r in recs:
            module = r.param.rsplit(".", 1)[0]
            q = quantized_method(methods.get(module))
            if q is None:
                continue
            if name.endswith(".weight") and dt in FP8:
                (quant_layers.add(module) if q else fp8_in_bf16.append(f"{name} -> {module}"))
            elif name.endswith(".weight") and q and r.param_dtype.startswith("float8"):
                bf16_in_fp8.append(module)
            elif name.endswith(".weight") and not q:
                plain_layers.add(module)
            if (dt in FP8) != r.param_dtype.startswith("float8"):
                crossing.append(f"{name} ({str(dt).replace('torch.', '')}) -> {r.param} ({r.param_dtype})")
    unused = [n for n in dtypes if n not in by_tensor]
    # KV-cache scales and zero points of attention layers are the engine's own (the checkpoint has none)
    kv_cache = {m for m, q in methods.items() if "KVCache" in type(q).__name__}
    unwritten = [n for n, _ in tracker.model.named_parameters() if n not in tracker.written and not skip_params(n)
                 and n.rsplit(".", 1)[0] not in kv_cache]

    shown = {"vllm": "vLLM", "sglang": "SGLang"}.get(engine, engine)

    def named(items: list[str], most: int = 4) -> str:
        return ", ".join(items[:most]) + (f" and {len(items) - most} more" if len(items) > most else "")
    if bf16_in_fp8:
        result.add("error", f"{engine} layers",
                   f"{len(bf16_in_fp8)} BF16 linear(s) land in layers {shown} builds as FP8 (their BF16 "
                   f"weights are cast into FP8, their scales never written): {named(bf16_in_fp8, 16)} "
                   f"({shown}'s names); list them in the not-converted list")
    if fp8_in_bf16:
        result.add("error", f"{engine} layers",
                   f"{len(fp8_in_bf16)} FP8 weight(s) land in layers {shown} builds unquantized: {named(fp8_in_bf16)}")
    if crossing and not bf16_in_fp8:
        result.add("error", f"{engine} load", f"{len(crossing)} tensor(s) change between FP8 and another "
                                              f"dtype on load: {named(crossing)}")
    if unused:
        result.add("error", f"{engine} load", f"{len(unused)} checkpoint tensor(s) not used by {shown}'s "
                                              f"load_weights: {named(unused)}")
    if unwritten:
        result.add("error", f"{engine} load", f"{len(unwritten)} parameter(s) never written by load_weights: "
                                              f"{named(unwritten)}")
    result.layers.update(quantized=len(quant_layers), unquantized=len(plain_layers), tensors=len(dtypes),
                         consumed=len(dtypes) - len(unused))
    if not (bf16_in_fp8 or fp8_in_bf16 or crossing or unused or unwritten):
        result.add("ok", f"{engine} layers",
                   f"{len(quant_layers)} FP8 layers built quantized, {len(plain_layers)} kept layers built "
                   f"unquantized; load_weights used all {len(dtypes)} tensors, wrote every parameter")

