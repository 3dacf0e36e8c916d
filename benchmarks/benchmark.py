"""Side-by-side speed of MSViT (two and three patch sizes) against transformers' ViT/16 and ViT/32 of the same size.

    python -m benchmarks.benchmark                        # the committed CPU run (under 10 minutes on 2 cores)
    python -m benchmarks.benchmark --device cuda --dtypes bf16 --attn sdpa --batch_sizes 1 8 32 64 128 256

Every figure is a ratio measured in one process: for each (dtype, attention, batch size) cell the models run in
interleaved repetitions (ViT/16, ViT/32, MSViT at each fine ratio, then again), the first `--warmup` repetitions are
discarded and the median of the rest is kept. The fine ratio is forced exactly with the fixed budget
(`model.set_budget(fine_ratio=...)`), so every image of a batch has `1 + Nc + 3 * round(ratio * Nc)` tokens. Random
weights: speed does not depend on what the weights are.

Beside the two-scale MSViT (the preset's `patch_size` / `coarse_patch_size`, 16/32 px for msvit-tiny) runs, unless
`--no-three_scales`, the same backbone with a third, larger patch size (16/32/64 px, `config.patch_sizes`): its fine
ratio splits `round(ratio * D)` of its `D` decision nodes top-down (at 224 px the 9 regions of 64 px, their 36
children and the 13 border regions of 32 px: `D = 58`, `1 + 22 + 3 * round(ratio * 58)` tokens). Its rows are
measured in the same interleaved repetitions and reported as "3 scales (16/32/64)" next to "2 scales (16/32)".

Sections:
* `inference`: the grid above; speed-up = ViT/16 time / model time, beside the analytic MAC speed-up of the same
  inputs (`compute_macs` / `vit_macs`) and images/s.
* `image_sizes`: the same at each of `--extra_image_sizes` (448 px: models built for that size), at the first of
  `--dtypes` and of `--attn` and `--extra_batch_sizes` only.
* `ragged`: batches whose images have different fine ratios (forced split masks, mean = `--ragged_mean`), at each
  precision and `--ragged_batch_sizes`, run padded (every layer on the batch padded to its longest image) and packed
  (the layers on the active tokens only, attention on the padded batch; `config.ragged_execution`) with each of
  `--ragged_attn`, against the fixed budget at the same mean ratio; efficiency = measured / MAC speed-up. Three scales
  run their fixed budget and packed ragged batches (top-down layouts) in the same repetitions.
* `training`: one optimizer step (forward, backward, AdamW) of the ViT/16 and of the MSViT on the masked path (all
  `1 + Nc + Nf` candidate tokens, both masked-path attentions) and on the gathered path.
* `compiled` (with `--compile`): the fixed-budget MSViT and the ViT/16 under `torch.compile(fullgraph=True)`.

Outputs in `--output_dir`: `results.json` (every measurement and the machine), `table.md` and `speedup.png`;
`--docs docs/performance.md` rewrites that page's generated section from them.
"""

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import ViTConfig, ViTForImageClassification

from modeling_msvit import MSViTForImageClassification
from modeling_msvit.configuration_msvit import VIT_CONFIG_FIELDS
from modeling_msvit.macs_msvit import vit_macs_for_config
from modeling_msvit.mixed_scale_tokens import ScaleTree, ranked_split_mask, token_counts
from msvit.configuration import load_preset, preset_names

from .report import check_targets, plot_speedups, update_docs, write_table


DTYPES = {"fp32": None, "bf16": torch.bfloat16}
SECTIONS = ("inference", "image_sizes", "ragged", "training", "compiled")
# the MSViTs of a run: the preset's two patch sizes, and (unless --no-three_scales) one larger size added
MSVIT_MODELS = ("msvit", "msvit3")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--preset", default="msvit-tiny", choices=preset_names(), help="MSViT size; the ViTs get its width/depth.")
    add("--image_size", type=int, default=224)
    add("--batch_sizes", type=int, nargs="+", default=[1, 8, 32, 64])
    add("--fine_ratios", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    add("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"], help="bf16 = autocast.")
    add("--attn", nargs="+", choices=("eager", "sdpa"), default=["sdpa", "eager"], help="attn_implementation.")
    add("--warmup", type=int, default=1, help="Discarded repetitions per cell.")
    add("--repeats", type=int, default=5, help="Timed repetitions per cell, at least (the median is kept).")
    add("--min_cell_seconds", type=float, default=3.0, help="Repeat a cell until its timed repetitions last this.")
    add("--threads", type=int, default=torch.get_num_threads(), help="torch.set_num_threads (CPU).")
    add("--device", default="cpu")
    add(
        "--three_scales",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Also time the MSViT with a third patch size (the preset's sizes and one more level: 16/32/64).",
    )
    add("--extra_image_sizes", type=int, nargs="*", default=[448], help="Image sizes of the `image_sizes` section.")
    add("--extra_batch_sizes", type=int, nargs="+", default=[1, 8], help="Batch sizes of the `image_sizes` section.")
    add("--ragged_batch_sizes", type=int, nargs="+", default=[8, 32, 64])
    add(
        "--ragged_attn",
        nargs="+",
        choices=("eager", "sdpa", "flex_attention"),
        default=["sdpa", "eager"],
        help="attn_implementation of the ragged batches.",
    )
    add("--ragged_mean", type=float, default=0.5, help="Mean fine ratio of the ragged batch (spread +-0.25).")
    add("--train_batch_size", type=int, default=16)
    add(
        "--sections",
        nargs="+",
        choices=SECTIONS,
        default=["inference", "image_sizes", "ragged", "training"],
        help="What to measure; `compiled` (torch.compile(fullgraph=True)) adds minutes of compiling on CPU.",
    )
    add("--output_dir", type=Path, default=Path("benchmarks/results/cpu"))
    add("--docs", type=Path, help="Rewrite the generated section of this page (docs/performance.md).")
    add("--seed", type=int, default=0)
    return parser.parse_args(argv)


def build_models(args: argparse.Namespace, image_size: int | None = None) -> dict[str, torch.nn.Module]:
    """The MSViT preset and ViT/16 and ViT/32 classifiers of the same width, depth and head, random weights, for
    `image_size` (default `--image_size`); with `--three_scales` also the preset with one more patch size."""
    torch.manual_seed(args.seed)
    image_size = image_size or args.image_size
    # built for the straight-through objective, whose gBaS priors the training section's straight-through steps need;
    # the counterfactual step switches the objective (speed does not depend on which the model was built for)
    config = load_preset(args.preset, image_size=image_size, num_labels=1000, gate_objective="straight_through")
    # every ViT field of the preset (the 1,000-label head included) except the patch size
    vit_fields = {name: getattr(config, name) for name in VIT_CONFIG_FIELDS if name != "patch_size"}
    models = {
        "vit16": ViTForImageClassification(ViTConfig(patch_size=config.patch_size, **vit_fields)),
        "vit32": ViTForImageClassification(ViTConfig(patch_size=config.coarse_patch_size, **vit_fields)),
        "msvit": MSViTForImageClassification(config),
    }
    if args.three_scales:
        sizes = [config.patch_size, config.coarse_patch_size, config.coarse_patch_size * config.scale_ratio]
        three = load_preset(
            args.preset, image_size=image_size, num_labels=1000, gate_objective="straight_through", patch_sizes=sizes
        )
        models["msvit3"] = MSViTForImageClassification(three)
    return {name: model.to(args.device) for name, model in models.items()}


def msvit_names(models: dict[str, torch.nn.Module]) -> list[str]:
    return [name for name in MSVIT_MODELS if name in models]


def scale_label(config) -> str:
    """'2 scales (16/32)', '3 scales (16/32/64)'."""
    return f"{config.num_scales} scales ({'/'.join(str(size) for size in config.scale_sizes)})"


def describe_msvits(models: dict[str, torch.nn.Module], image_sizes: list[int]) -> dict[str, dict]:
    """Per MSViT: its label, patch sizes and, per image size, its decision nodes and roots (tokens when nothing is
    split, CLS excluded): what the report needs to explain token counts."""
    described = {}
    for name in msvit_names(models):
        base = models[name].base_model
        trees = {str(size): base.scale_tree(size, size) for size in image_sizes}
        described[name] = {
            "label": scale_label(base.config),
            "patch_sizes": list(base.config.scale_sizes),
            "trees": {
                size: {"decisions": tree.num_decisions, "roots": tree.num_roots} for size, tree in trees.items()
            },
        }
    return described


def vit_macs_per_image(models: dict[str, torch.nn.Module]) -> dict[str, float]:
    return {name: float(vit_macs_for_config(models[name].config, num_labels=1000)) for name in ("vit16", "vit32")}


def msvit_macs_per_image(msvit: torch.nn.Module, token_counts: torch.Tensor) -> float:
    """Mean analytic MACs per image of the MSViT over a batch with these token counts."""
    return msvit.compute_macs(token_counts.cpu()).double().mean().item()


class Timer:
    """Wall time of a callable, synchronising the accelerator so that queued kernels are counted."""

    def __init__(self, device: str):
        self.synchronize = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def __call__(self, function: Callable[[], object]) -> float:
        self.synchronize()
        start = time.perf_counter()
        function()
        self.synchronize()
        return time.perf_counter() - start


def interleaved_medians(
    runners: dict[str, Callable[[], object]], timer: Timer, warmup: int, repeats: int, min_seconds: float = 0.0
) -> dict[str, list[float]]:
    """Seconds of each runner over interleaved repetitions, after `warmup` discarded ones: at least `repeats`, and
    more while the timed repetitions took less than `min_seconds` in all (cheap cells get more samples)."""
    seconds = {name: [] for name in runners}
    for _ in range(warmup):
        for runner in runners.values():
            timer(runner)
    started = time.perf_counter()
    while len(seconds[next(iter(runners))]) < repeats or time.perf_counter() - started < min_seconds:
        for name, runner in runners.items():
            seconds[name].append(timer(runner))
    return seconds


def summarise(seconds: list[float], batch_size: int, baseline: list[float], macs: float, baseline_macs: float):
    median = statistics.median(seconds)
    speedup = statistics.median(baseline) / median
    mac_speedup = baseline_macs / macs
    return {
        "seconds": median,
        "seconds_all": seconds,
        "images_per_second": batch_size / median,
        "gmacs_per_image": macs / 1e9,
        "speedup_vs_vit16": speedup,
        "mac_speedup_vs_vit16": mac_speedup,
        "efficiency": speedup / mac_speedup,
    }


def inference_runner(model: torch.nn.Module, pixel_values: torch.Tensor, autocast, **kwargs) -> Callable[[], object]:
    def run():
        with torch.inference_mode(), autocast():
            return model(pixel_values, **kwargs)

    return run


def autocast_for(dtype_name: str, device: str):
    dtype = DTYPES[dtype_name]
    device_type = torch.device(device).type
    return (lambda: torch.autocast(device_type, dtype=dtype)) if dtype is not None else nullcontext


def time_fixed_budgets(args, models, timer: Timer, pixel_values: torch.Tensor, autocast, base: dict) -> list[dict]:
    """One cell: the ViT/16, the ViT/32 and every MSViT at every fine ratio (fixed budget), in interleaved
    repetitions; its records (ViTs, then each MSViT's ratios), every speed-up against this cell's ViT/16."""
    batch_size = pixel_values.shape[0]
    vit_macs = vit_macs_per_image(models)
    runners = {(name, None): inference_runner(models[name], pixel_values, autocast) for name in ("vit16", "vit32")}
    counts = {}
    for name in msvit_names(models):
        msvit = models[name]
        for ratio in args.fine_ratios:
            msvit.set_budget(fine_ratio=ratio)
            with torch.inference_mode():
                counts[(name, ratio)] = msvit(pixel_values).token_counts
            runners[(name, ratio)] = budget_runner(msvit, pixel_values, autocast, ratio)
    seconds = interleaved_medians(runners, timer, args.warmup, args.repeats, args.min_cell_seconds)
    baseline = seconds[("vit16", None)]
    records = []
    for name in ("vit16", "vit32"):
        records.append(
            {
                **base,
                "model": name,
                "fine_ratio": None,
                "tokens": models[name].vit.embeddings.patch_embeddings.num_patches + 1,
            }
            | summarise(seconds[(name, None)], batch_size, baseline, vit_macs[name], vit_macs["vit16"])
        )
    for (name, ratio), image_counts in counts.items():
        macs = msvit_macs_per_image(models[name], image_counts)
        records.append(
            {**base, "model": name, "fine_ratio": ratio, "tokens": int(image_counts[0])}
            | summarise(seconds[(name, ratio)], batch_size, baseline, macs, vit_macs["vit16"])
        )
    return records


def bench_inference(args, models, timer: Timer) -> list[dict]:
    records = []
    cells = [(dtype, attn, size) for dtype in args.dtypes for attn in args.attn for size in args.batch_sizes]
    for dtype, attn, batch_size in tqdm(cells, desc="inference", unit="cell"):
        for model in models.values():
            model.set_attn_implementation(attn)
        pixel_values = torch.randn(batch_size, 3, args.image_size, args.image_size, device=args.device)
        base = {"dtype": dtype, "attn": attn, "batch_size": batch_size}
        records += time_fixed_budgets(args, models, timer, pixel_values, autocast_for(dtype, args.device), base)
    return records


def bench_image_sizes(args, models, timer: Timer) -> list[dict]:
    """The inference grid's fixed budgets at `--extra_image_sizes`, each with models built for that size (the ViTs'
    position embeddings and the MSViTs' trees), at the first of `--dtypes` and `--attn`."""
    records = []
    dtype, attn = args.dtypes[0], args.attn[0]
    progress = tqdm(total=len(args.extra_image_sizes) * len(args.extra_batch_sizes), desc="image sizes", unit="cell")
    for image_size in args.extra_image_sizes:
        sized = build_models(args, image_size)
        for model in sized.values():
            model.eval()
            model.set_attn_implementation(attn)
        for batch_size in args.extra_batch_sizes:
            pixel_values = torch.randn(batch_size, 3, image_size, image_size, device=args.device)
            with torch.inference_mode():  # first-call allocations of this shape
                for model in sized.values():
                    model(pixel_values)
            base = {"image_size": image_size, "dtype": dtype, "attn": attn, "batch_size": batch_size}
            records += time_fixed_budgets(args, sized, timer, pixel_values, autocast_for(dtype, args.device), base)
            progress.update()
    progress.close()
    return records


def budget_runner(msvit, pixel_values, autocast, ratio: float) -> Callable[[], object]:
    run = inference_runner(msvit, pixel_values, autocast)

    def run_at_budget():
        msvit.set_budget(fine_ratio=ratio)
        return run()

    return run_at_budget


def ragged_split_mask(batch_size: int, tree: ScaleTree, mean: float, generator: torch.Generator) -> torch.Tensor:
    """Split masks whose per-image fine ratios (of the tree's `D` decision nodes) spread evenly over `mean +- 0.25`,
    in random regions, top-down: every split node's parent is split, so each mask is an effective layout. With two
    scales (`D = Nc`, no parents) these are the `round(ratio * Nc)` regions of lowest uniform draw."""
    ratios = torch.linspace(max(mean - 0.25, 0.0), min(mean + 0.25, 1.0), batch_size)
    scores = -torch.rand(batch_size, tree.num_decisions, generator=generator)
    # the fixed budget's top-down selection (best-first expansion), with its own split count per image
    return ranked_split_mask(scores, (ratios[:, None] * tree.num_decisions).round(), tree.to("cpu"))


def configured_runner(
    model, attn_implementation: str, ragged_execution: str | None, run: Callable[[], object]
) -> Callable[[], object]:
    """`run` with the model switched to this attention implementation (and ragged execution) first."""

    def run_configured():
        model.set_attn_implementation(attn_implementation)
        if ragged_execution is not None:
            model.config.ragged_execution = ragged_execution
        return run()

    return run_configured


def bench_ragged(args, models, timer: Timer) -> list[dict]:
    names = msvit_names(models)
    vit_macs = vit_macs_per_image(models)["vit16"]
    records = []
    cells = [(dtype, size) for dtype in args.dtypes for size in args.ragged_batch_sizes]
    for dtype, batch_size in tqdm(cells, desc="ragged", unit="cell"):
        generator = torch.Generator().manual_seed(args.seed)
        pixel_values = torch.randn(batch_size, 3, args.image_size, args.image_size, device=args.device)
        autocast = autocast_for(dtype, args.device)
        vit_run = inference_runner(models["vit16"], pixel_values, autocast)
        # keys (model, path, attention): the ViT/16 and the two-scale MSViT's paths as they always ran, then the
        # three-scale MSViT's fixed budget and packed ragged batch
        runners = {("vit16", "vit16", "sdpa"): configured_runner(models["vit16"], "sdpa", None, vit_run)}
        counts = {}
        for name in names:
            msvit = models[name]
            tree = msvit.base_model.scale_tree(args.image_size, args.image_size)
            split_mask = ragged_split_mask(batch_size, tree, args.ragged_mean, generator).to(args.device)
            counts[name] = token_counts(split_mask, tree)
            budget_run = budget_runner(msvit, pixel_values, autocast, args.ragged_mean)
            runners[(name, "fixed budget", "sdpa")] = configured_runner(msvit, "sdpa", None, budget_run)
            ragged_run = inference_runner(msvit, pixel_values, autocast, split_mask=split_mask)
            executions = ("padded", "packed") if name == "msvit" else ("packed",)
            for attn in args.ragged_attn:
                for execution in executions:
                    runners[(name, execution, attn)] = configured_runner(msvit, attn, execution, ragged_run)
        # one untimed call each (flex attention compiles its kernels for new shapes); the budget runs' token counts
        outputs = {key: runner() for key, runner in runners.items()}
        budget_counts = {key[0]: output.token_counts for key, output in outputs.items() if key[1] == "fixed budget"}
        del outputs
        seconds = interleaved_medians(runners, timer, args.warmup, args.repeats, args.min_cell_seconds)
        for (name, path, attn), values in seconds.items():
            if path == "vit16":
                macs = vit_macs
            elif path == "fixed budget":
                macs = msvit_macs_per_image(models[name], budget_counts[name])
            else:
                macs = msvit_macs_per_image(models[name], counts[name])
            # the two-scale rows as they always were (the ViT/16 row describes the two-scale batch); the three-scale
            # rows name their model
            batch_counts = counts["msvit" if name == "vit16" else name]
            records.append(
                {"dtype": dtype, "batch_size": batch_size}
                | ({"model": name} if name not in ("vit16", "msvit") else {})
                | {
                    "path": path,
                    "attn": attn,
                    "tokens_min": int(batch_counts.min()),
                    "tokens_max": int(batch_counts.max()),
                    "tokens_mean": batch_counts.float().mean().item(),
                }
                | summarise(values, batch_size, seconds[("vit16", "vit16", "sdpa")], macs, vit_macs)
            )
    return records


def bench_training(args, models, timer: Timer) -> list[dict]:
    msvit = models["msvit"]
    batch_size = args.train_batch_size
    generator = torch.Generator().manual_seed(args.seed)
    pixel_values = torch.randn(batch_size, 3, args.image_size, args.image_size, generator=generator).to(args.device)
    labels = torch.randint(0, 1000, (batch_size,), generator=generator).to(args.device)
    # (model, forward arguments, masked-path attention, gate objective): the paper's straight-through objective on
    # each path, and the counterfactual objective (its one extra no-grad forward of the flipped layouts included)
    variants = {
        "vit16": (models["vit16"], {}, None, None),
        "masked (key mask)": (msvit, {"token_path": "masked"}, "key_mask", "straight_through"),
        "masked (masked softmax)": (msvit, {"token_path": "masked"}, "masked_softmax", "straight_through"),
        "gathered": (msvit, {"token_path": "gathered"}, None, "straight_through"),
        "counterfactual (gathered, 1 flip)": (msvit, {"token_path": "gathered"}, None, "counterfactual"),
    }
    optimizers = {name: torch.optim.AdamW(variant[0].parameters(), lr=1e-6) for name, variant in variants.items()}
    runners = {}
    for name, (model, kwargs, masked_attention, objective) in variants.items():

        def step(
            model=model,
            kwargs=kwargs,
            masked_attention=masked_attention,
            objective=objective,
            optimizer=optimizers[name],
        ):
            model.train()
            if masked_attention is not None:
                model.config.masked_path_attention = masked_attention
            if objective is not None:
                model.config.gate_objective = objective
            loss = model(pixel_values, labels=labels, **kwargs).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        runners[name] = step
    for model in models.values():
        model.set_attn_implementation("sdpa")
    seconds = interleaved_medians(runners, timer, args.warmup, args.repeats, args.min_cell_seconds)
    for model in models.values():
        model.eval()
    base = statistics.median(seconds["vit16"])
    return [
        {
            "batch_size": batch_size,
            "attn": "sdpa",
            "path": name,
            "seconds": statistics.median(values),
            "seconds_all": values,
            "time_vs_vit16": statistics.median(values) / base,
        }
        for name, values in seconds.items()
    ]


def bench_compiled(args, models, timer: Timer) -> list[dict]:
    msvit, vit16 = models["msvit"], models["vit16"]
    for model in models.values():
        model.set_attn_implementation("sdpa")
    batch_size = 8 if 8 in args.batch_sizes else args.batch_sizes[0]
    pixel_values = torch.randn(batch_size, 3, args.image_size, args.image_size, device=args.device)
    msvit.set_budget(fine_ratio=0.5)
    compiled = {"vit16": torch.compile(vit16, fullgraph=True), "msvit": torch.compile(msvit, fullgraph=True)}
    runners = {
        "vit16": inference_runner(vit16, pixel_values, nullcontext),
        "msvit": inference_runner(msvit, pixel_values, nullcontext),
        "vit16 compiled": inference_runner(compiled["vit16"], pixel_values, nullcontext),
        "msvit compiled": inference_runner(compiled["msvit"], pixel_values, nullcontext),
    }
    for name in tqdm(("vit16 compiled", "msvit compiled"), desc="compiling", unit="model"):
        runners[name]()
    seconds = interleaved_medians(runners, timer, args.warmup, args.repeats, args.min_cell_seconds)
    base = statistics.median(seconds["vit16"])
    return [
        {"batch_size": batch_size, "fine_ratio": 0.5, "model": name, "seconds": statistics.median(values)}
        | {"speedup_vs_vit16": base / statistics.median(values)}
        for name, values in seconds.items()
    ]


def warm_up(args, models) -> None:
    """One pass of every model at every batch size, so that no cell pays for first-call allocations."""
    for batch_size in tqdm(args.batch_sizes, desc="warm-up", unit="batch size"):
        pixel_values = torch.randn(batch_size, 3, args.image_size, args.image_size, device=args.device)
        with torch.inference_mode():
            for model in models.values():
                model(pixel_values)


def machine_description(device: str, threads: int) -> dict:
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(device)
    else:
        name = cpu_model_name()
    return {
        "device": name,
        "platform": platform.platform(),
        "torch": torch.__version__,
        "threads": threads,
        "python": platform.python_version(),
    }


def cpu_model_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    models = build_models(args)
    for model in models.values():
        model.eval()
    timer = Timer(args.device)
    started = time.perf_counter()
    image_sizes = [args.image_size] + (args.extra_image_sizes if "image_sizes" in args.sections else [])
    results = {
        "machine": machine_description(args.device, args.threads),
        "protocol": {
            "preset": args.preset,
            "image_size": args.image_size,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "statistic": "median",
            "order": "interleaved",
            "min_cell_seconds": args.min_cell_seconds,
            "msvits": describe_msvits(models, image_sizes),
        },
    }
    warm_up(args, models)
    benches = {"inference": bench_inference, "ragged": bench_ragged, "training": bench_training}
    benches |= {"image_sizes": bench_image_sizes, "compiled": bench_compiled}
    for section in args.sections:
        results[section] = benches[section](args, models, timer)
    results["protocol"]["wall_seconds"] = round(time.perf_counter() - started, 1)
    results["targets"] = check_targets(results)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    table = write_table(results, args.output_dir / "table.md")
    if "inference" in results:
        plot_speedups(results, args.output_dir / "speedup.png")
    if args.docs is not None:
        update_docs(args.docs, table, args.output_dir)
    print(table)
    return results


if __name__ == "__main__":
    main()
