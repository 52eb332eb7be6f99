"""Cost of the evaluation after a task: zero-shot text heads (cached or rebuilt) and the image pass.

    python bench/eval_cost.py                          # quickstart (tiny model) + FoMo-in-Flux-sized heads (~5 min)
    python bench/eval_cost.py --quick --data-root /tmp/bench

1. Quickstart, measured. The evaluation CLIPFineTuner runs after each task (`on_validation_epoch_start`:
   `ZeroShotEvaluator.prepare`; `validation_step`: `update`; `on_validation_epoch_end`: `compute`), called directly on
   the data module's validation loaders in the stream's `subset` scope, with the quickstart's base model:
   * heads built for the first time; `prepare` again with the same weights (cached: only the text-tower fingerprint
     is computed); after a change of the visual tower only (cached); after a change of the text tower (rebuilt);
   * the image pass (read, decode, encode; retrieval captions are encoded here, never cached), held-out datasets
     and adaptation datasets apart; `compute`.
2. FoMo-in-Flux-sized heads, extrapolated. The class names and prompt templates of the shipped 63 manifests give
   the prompts one head build encodes. A sample of them is encoded with ViT-B-16's text tower (random weights: the
   cost does not depend on them) on this CPU; seconds per prompt x prompts = an ESTIMATE of one rebuild on one CPU
   core set like this one. Also the text-tower fingerprint of ViT-B-16 (paid at every evaluation, cached or not),
   and the GPU time of a rebuild from the text tower's counted FLOPs at an assumed MFU (ESTIMATE).

With full fine-tuning both towers change in every task, so during a stream the heads are rebuilt at every evaluation;
the cache saves the rebuild when the same weights are evaluated again (e.g. a resumed run's repeated evaluation, a
`timelit validate` of deployed weights already evaluated) and for protocols that leave the text tower unchanged.
Prints tables and writes bench/results/eval_cost.json.
"""

from __future__ import annotations

import argparse
import functools
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import QUICKSTART, benchmark_args, machine, median, synthetic_data, table, write_report

H100_BF16_DENSE_TFLOPS = 989.4


def _timed(fn: Any, *args: Any) -> float:
    began = time.perf_counter()
    fn(*args)
    return time.perf_counter() - began


def quickstart(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    import json

    import torch
    from torch.utils.data import DataLoader

    from timelit.data.loaders import loader_kwargs
    from timelit.training.clip import build_clip, load_pretrained
    from timelit.training.evaluation.evaluator import ZeroShotEvaluator

    model_name = json.loads((root / "READY.json").read_text()).get("base_model", "timelit-tiny-ViT")
    bundle = build_clip(model_name)
    model = bundle.model.eval()
    load_pretrained(model, model_name, str(root / "base_model.safetensors"))
    training = {"num_tasks": 4, "batch_size": 128, "steps_per_task": 1}  # only the evaluation loaders are read
    data = synthetic_data(root, bundle, eval_batch_size=args.eval_batch_size, num_workers=args.workers, **training)
    device = torch.device("cpu")
    runs = []
    for _ in range(args.repeats):
        evaluator = ZeroShotEvaluator()
        evaluator.configure(data.eval_specs)
        run: dict[str, float] = {}

        prepare = functools.partial(evaluator.prepare, model, bundle.tokenizer, device)
        run["heads: first build"] = _timed(prepare)
        run["heads: same weights (cached)"] = _timed(prepare)
        with torch.no_grad():
            model.visual.proj.add_(1e-4 * torch.randn_like(model.visual.proj))
        run["heads: visual tower changed (cached)"] = _timed(prepare)
        with torch.no_grad():
            model.text_projection.add_(1e-4 * torch.randn_like(model.text_projection))
        run["heads: text tower changed (rebuilt)"] = _timed(prepare)
        builds = evaluator.head_builds
        for role, label in (("eval", "images: held-out datasets"), ("adapt", "images: adaptation datasets")):
            began = time.perf_counter()
            for number, spec in enumerate(data.eval_specs):
                if spec.role != role:
                    continue
                loader = DataLoader(data.eval_batches(spec, "subset"), batch_size=None, **loader_kwargs(args.workers))
                for batch in loader:
                    evaluator.update(number, model, batch)
            run[label] = time.perf_counter() - began
        run["compute figures"] = _timed(evaluator.compute, "subset", device, int(model.visual.output_dim))
        run["head_builds"] = builds
        runs.append(run)
    specs = data.eval_specs
    summary = {key: median(r[key] for r in runs) for key in runs[0]}
    return {
        "model": model_name,
        "workers": args.workers,
        "runs": runs,
        "median": summary,
        "datasets": {
            s.name: {"role": s.role, "task": s.task, "subset": len(s.subset), "classes": len(s.classnames)}
            for s in specs
        },
        "prompts": sum(len(s.classnames) * len(s.prompt_templates) for s in specs if s.task == "classification"),
    }


def fomo_heads(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from timelit.data.manifest import load_manifests
    from timelit.training.clip import build_clip
    from timelit.training.evaluation.zero_shot import encode_texts, text_tower_fingerprint
    from timelit.training.flops import build_meta_model

    manifests = load_manifests("fomo_in_flux")
    prompts = {"adapt": [], "eval": []}
    for role in prompts:
        for m in manifests.by_role(role):
            if m.task == "classification" and m.classnames:
                prompts[role] += [t.format(c) for c in m.classnames for t in m.prompt_templates]
    every = prompts["adapt"] + prompts["eval"]
    sample = random.Random(0).sample(every, min(args.prompt_sample, len(every)))
    bundle = build_clip(args.text_model)
    model = bundle.model.eval()
    with torch.no_grad():
        encode_texts(model, bundle.tokenizer, sample[:8], torch.device("cpu"))  # warm-up
    seconds = []
    for _ in range(args.repeats):
        began = time.perf_counter()
        encode_texts(model, bundle.tokenizer, sample, torch.device("cpu"))
        seconds.append(time.perf_counter() - began)
    per_prompt = median(seconds) / len(sample)
    fingerprint = median(_timed(text_tower_fingerprint, model) for _ in range(args.repeats))
    meta = build_meta_model(args.text_model)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        meta.encode_text(torch.zeros(1, meta.context_length, dtype=torch.long, device="meta"))
    gflops_per_prompt = counter.get_total_flops() / 1e9
    gpu_s = len(every) * gflops_per_prompt / (args.assumed_mfu * H100_BF16_DENSE_TFLOPS * 1e3)
    held_out = sum(1 for m in manifests.by_role("eval"))
    return {
        "text_model": args.text_model,
        "prompts_adapt": len(prompts["adapt"]),
        "prompts_held_out": len(prompts["eval"]),
        "held_out_datasets": held_out,
        "sample": len(sample),
        "torch_threads": torch.get_num_threads(),
        "cpu_seconds_per_prompt": per_prompt,
        "cpu_rebuild_all_s_ESTIMATE": per_prompt * len(every),
        "cpu_rebuild_held_out_s_ESTIMATE": per_prompt * len(prompts["eval"]),
        "fingerprint_s": fingerprint,
        "gflops_per_prompt": gflops_per_prompt,
        "gpu_rebuild_all_s_ESTIMATE": gpu_s,
        "gpu_assumption": f"H100 SXM bf16 dense {H100_BF16_DENSE_TFLOPS} TFLOPS x MFU {args.assumed_mfu:.0%}",
        "load": os.getloadavg()[0],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    import torch
    from train_overhead import ensure_data

    if args.threads:
        torch.set_num_threads(args.threads)
    root = ensure_data(Path(args.data_root), args.quick)
    report: dict[str, Any] = {"machine": machine(), "settings": vars(args)}
    report["quickstart"] = quickstart(args, root)
    print(render_quickstart(report["quickstart"]), flush=True)
    report["fomo_in_flux"] = fomo_heads(args)
    print(render_fomo(report["fomo_in_flux"]))
    path = write_report("eval_cost", report, Path(args.out))
    print(f"\nwrote {path}")
    return report


def render_quickstart(q: dict[str, Any]) -> str:
    subset = sum(d["subset"] for d in q["datasets"].values())
    head = (
        f"quickstart evaluation after a task ({q['model']}, {len(q['datasets'])} datasets, {subset} subset images, "
        f"{q['prompts']} prompts, {q['workers']} loader workers); medians of {len(q['runs'])} runs"
    )
    rows = [(k, v) for k, v in q["median"].items() if k != "head_builds"]
    return (
        head
        + "\n"
        + table(["phase", "seconds"], rows)
        + f"\nhead builds in 4 prepare calls: {q['median']['head_builds']:.0f}"
    )


def render_fomo(f: dict[str, Any]) -> str:
    rows = [
        (
            "prompts (adaptation / held-out classification datasets)",
            f"{f['prompts_adapt']:,} / {f['prompts_held_out']:,}",
        ),
        (
            f"CPU seconds per prompt ({f['text_model']} text tower, {f['torch_threads']} threads, sample of "
            f"{f['sample']})",
            f"{f['cpu_seconds_per_prompt'] * 1e3:.2f} ms",
        ),
        ("rebuild all heads on this CPU (ESTIMATE: x prompts)", f"{f['cpu_rebuild_all_s_ESTIMATE']:.0f} s"),
        ("rebuild held-out heads on this CPU (ESTIMATE)", f"{f['cpu_rebuild_held_out_s_ESTIMATE']:.0f} s"),
        ("cached: text-tower fingerprint (measured, every evaluation)", f"{f['fingerprint_s']:.2f} s"),
        (
            f"rebuild all heads on a GPU (ESTIMATE: {f['gflops_per_prompt']:.2f} GFLOPs per prompt, "
            f"{f['gpu_assumption']})",
            f"{f['gpu_rebuild_all_s_ESTIMATE']:.2f} s",
        ),
    ]
    return "\nFoMo-in-Flux-sized zero-shot heads\n" + table(["", "value"], rows)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-root", default=QUICKSTART)
    parser.add_argument("--workers", type=int, default=0, help="evaluation loader workers")
    parser.add_argument("--eval-batch-size", type=int, default=256, help="as quickstart.yaml")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--text-model", default="ViT-B-16")
    parser.add_argument("--prompt-sample", type=int, default=512)
    parser.add_argument("--assumed-mfu", type=float, default=0.4)
    return benchmark_args(parser, argv, {"repeats": 1, "text_model": "timelit-micro-ViT", "prompt_sample": 16})


if __name__ == "__main__":
    main()
