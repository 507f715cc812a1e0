"""cpuboost inside the frameworks users already run, side by side in one process: pipelines, Trainer,
accelerate, Lightning, each on a BERT-base-sized text classifier and a ViT-B-sized image classifier.

    python benchmarks/frameworks.py                                   # BERT-base + ViT-B/16, 100 inputs, 12 steps
    python benchmarks/frameworks.py --size small --inputs 24 --steps 6   # a quick look (4 layers, width 256)
    python benchmarks/frameworks.py --only pipeline --models bert

Pipelines: ``inputs`` texts of 8-256 words (log-uniform) or images of assorted sizes, batch 1: the first pass
(every build and verification included; cpuboost's builds, families and sizes checked are printed beside it,
with a fresh persistent cache unless ``--cache-dir``) and the steady throughput of a second pass over the same
inputs. Trainer: ``bf16``, ``bf16+compile`` (its torch_compile), cpuboost, and cpuboost with compile_training=True.
Training: ``steps`` steps of batch 8 (texts of 128 tokens, 224 px images); steps/s over the steps after
``--warmup`` (compiles land in those), and the last loss. A framework's loop cannot be interleaved with
another's, so each variant runs ``--repeat`` times in rotated order and the best run is kept (steady pipeline
passes are interleaved); the machine's load is printed beside the numbers. Random weights from
configs; no downloads.
"""
from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

import cpuboost

SIZES = {"base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
         "small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024)}
VOCAB = 30522


# -- models and data -------------------------------------------------------------------------------------
def make_model(kind: str, size: str):
    import transformers

    torch.manual_seed(0)
    if kind == "bert":
        cfg = transformers.BertConfig(vocab_size=VOCAB, num_labels=2, **SIZES[size])
        return transformers.BertForSequenceClassification(cfg)
    cfg = transformers.ViTConfig(image_size=224, patch_size=16, num_labels=10, **SIZES[size])
    return transformers.ViTForImageClassification(cfg)


def tokenizer(folder: Path):
    import transformers

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(VOCAB - 5)]
    (folder / "vocab.txt").write_text("\n".join(words))
    return transformers.BertTokenizer(str(folder / "vocab.txt"))


def pipeline_inputs(kind: str, n: int) -> list:
    rng = np.random.RandomState(0)
    if kind == "bert":
        lengths = np.exp(rng.uniform(math.log(8), math.log(256), n)).astype(int)
        return [" ".join(f"w{w}" for w in rng.randint(0, VOCAB - 5, size)) for size in lengths]
    from PIL import Image

    return [Image.fromarray((rng.rand(rng.randint(160, 400), rng.randint(160, 400), 3) * 255).astype("uint8"))
            for _ in range(n)]


class TrainRows(torch.utils.data.Dataset):
    """Fixed-shape rows (128 tokens or 224 px) with a learnable label."""

    def __init__(self, kind: str, n: int) -> None:
        gen = torch.Generator().manual_seed(0)
        self.kind = kind
        if kind == "bert":
            self.x = torch.randint(5, VOCAB, (n, 128), generator=gen)
            self.y = self.x[:, 1] % 2
        else:
            self.y = torch.randint(0, 10, (n,), generator=gen)
            self.x = torch.randn(10, 3, 224, 224, generator=gen)[self.y] + torch.randn(n, 3, 224, 224, generator=gen)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        key = "input_ids" if self.kind == "bert" else "pixel_values"
        return {key: self.x[i], "labels": self.y[i]}


def collate(rows: list[dict]) -> dict:
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


# -- pipelines -------------------------------------------------------------------------------------------
def bench_pipeline(kind: str, ns, folder: Path) -> list[tuple]:
    import transformers

    task = "text-classification" if kind == "bert" else "image-classification"
    parts = ({"tokenizer": tokenizer(folder)} if kind == "bert"
             else {"image_processor": transformers.ViTImageProcessor(size={"height": 224, "width": 224})})
    inputs = pipeline_inputs(kind, ns.inputs)
    pipes, firsts, graphs = {}, {}, {}
    for name in ("plain fp32", "cpuboost bf16"):
        model = make_model(kind, ns.size).eval()
        if name.startswith("cpuboost"):
            model = cpuboost.optimize(model, dtype="bf16", cache_dir=ns.cache_dir or str(folder / "cache"))
            cpuboost.explain(model).MAX_GRAPHS = 10 * ns.inputs  # every record of the first pass kept
        pipes[name] = transformers.pipeline(task, model=model, **parts)
        begin = time.perf_counter()
        pipes[name](inputs, batch_size=ns.pipeline_batch)
        firsts[name] = time.perf_counter() - begin
        graphs[name] = first_pass_builds(model) if name.startswith("cpuboost") else ""
        print(f"  pipeline {name}: first pass {firsts[name]:.1f} s {graphs[name]}", flush=True)
    best = dict.fromkeys(pipes, 0.0)
    for _ in range(ns.repeat):  # steady passes interleaved, best of each: load from elsewhere hits both alike
        for name, pipe in pipes.items():
            begin = time.perf_counter()
            pipe(inputs, batch_size=ns.pipeline_batch)
            best[name] = max(best[name], len(inputs) / (time.perf_counter() - begin))
    return [(f"pipeline {task}", name, firsts[name], best[name], graphs[name]) for name in pipes]


def first_pass_builds(model) -> str:
    """What the first pass spent beyond serving: builds (and their seconds), families, sizes checked against eager."""
    report = cpuboost.explain(model)
    served = [g for g in report.graphs if g.rungs and g.rungs[0].fate.startswith("served (dynamic graph")]
    built = [g for g in report.graphs if g not in served]
    checked = sum("verified on this size" in g.rungs[0].fate for g in served)
    families = len(model._cache.families)
    return (f"({len(built)} builds in {sum(g.build_seconds for g in built):.1f} s, {families} families, "
            f"{len(served)} sizes served by a dynamic graph, {checked} of them checked against eager)")


# -- training loops ----------------------------------------------------------------------------------------
class StepClock:
    """Times each optimizer step of a framework's loop; steps/s after the warm-up steps."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.stamps, self.loss = warmup, [time.perf_counter()], float("nan")

    def tick(self, loss=None) -> None:
        self.stamps.append(time.perf_counter())
        if loss is not None:
            self.loss = float(loss)

    def rate(self) -> float:
        timed = self.stamps[self.warmup:]
        return (len(timed) - 1) / (timed[-1] - timed[0]) if len(timed) > 1 else float("nan")

    def warmup_seconds(self) -> float:
        return self.stamps[min(self.warmup, len(self.stamps) - 1)] - self.stamps[0]


def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def run_trainer(kind: str, ns, variant: str, folder: Path) -> StepClock:
    import transformers
    from cpuboost.integrations.transformers import trainer_parts

    clock = StepClock(ns.warmup)

    class Clock(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            clock.tick()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                clock.loss = logs["loss"]

    model = make_model(kind, ns.size)
    args = transformers.TrainingArguments(str(folder / variant), use_cpu=True, max_steps=ns.steps,
                                          per_device_train_batch_size=ns.batch, logging_steps=1, save_strategy="no",
                                          report_to=[], disable_tqdm=True, learning_rate=5e-5,
                                          bf16=not variant.startswith("cpuboost"),
                                          torch_compile=variant == "bf16+compile",
                                          dataloader_num_workers=0)
    parts = ({"model": model} if not variant.startswith("cpuboost")
             else trainer_parts(model, args, dtype="bf16", compile_training=variant == "cpuboost+compile"))
    trainer = transformers.Trainer(args=args, train_dataset=TrainRows(kind, ns.steps * ns.batch),
                                   data_collator=collate, callbacks=[Clock()], **parts)
    trainer.remove_callback(transformers.trainer_callback.PrinterCallback)  # the clock keeps the loss
    trainer.train()
    if variant.startswith("cpuboost"):
        print(f"  cpuboost {variant} applied: {', '.join(cpuboost.explain(parts['model']).applied)}", flush=True)
    _reset_accelerate()
    return clock


def run_accelerate(kind: str, ns, variant: str) -> StepClock:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    model = make_model(kind, ns.size).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5)
    if variant == "cpuboost":
        model, optimizer = cpuboost.optimize(model, optimizer, dtype="bf16")
    model, optimizer = accelerator.prepare(model, optimizer)
    loader = torch.utils.data.DataLoader(TrainRows(kind, ns.steps * ns.batch), batch_size=ns.batch,
                                         collate_fn=collate)
    clock = StepClock(ns.warmup)
    for batch in loader:
        loss = model(**batch).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        clock.tick(loss.item())
    _reset_accelerate()
    return clock


def run_lightning(kind: str, ns, variant: str, folder: Path) -> StepClock:
    import lightning as L
    from cpuboost.integrations.lightning import CpuBoostCallback

    clock = StepClock(ns.warmup)

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = make_model(kind, ns.size)

        def training_step(self, batch, index):
            return self.model(**batch).loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=5e-5)

    class Clock(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, index):
            clock.tick(outputs["loss"].item())

    callbacks = [Clock()] + ([CpuBoostCallback(dtype="bf16")] if variant == "cpuboost" else [])
    trainer = L.Trainer(accelerator="cpu", precision="bf16-mixed", max_steps=ns.steps, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        callbacks=callbacks, default_root_dir=str(folder))
    loader = torch.utils.data.DataLoader(TrainRows(kind, ns.steps * ns.batch), batch_size=ns.batch,
                                         collate_fn=collate)
    trainer.fit(Module(), loader)
    return clock


def bench_training(kind: str, ns, folder: Path) -> list[tuple]:
    runs = []
    if "trainer" in ns.only:
        runs += [("Trainer", v, lambda v=v: run_trainer(kind, ns, v, folder))
                 for v in ("bf16", "bf16+compile", "cpuboost", "cpuboost+compile") if v not in ns.skip]
    if "accelerate" in ns.only:
        runs += [("accelerate", v, lambda v=v: run_accelerate(kind, ns, v)) for v in ("bf16", "cpuboost")]
    if "lightning" in ns.only:
        runs += [("Lightning", v, lambda v=v: run_lightning(kind, ns, v, folder)) for v in ("bf16-mixed", "cpuboost")]
    if not runs:  # --only pipeline: no training framework asked for
        return []
    clocks: dict[tuple[str, str], list[StepClock]] = {(f, v): [] for f, v, _ in runs}
    for r in range(ns.repeat):  # each repeat in a rotated order; the best rate of each is kept
        for framework, variant, run in runs[r % len(runs):] + runs[:r % len(runs)]:
            try:
                clock = run()
            except Exception as exc:  # one variant failing (a compile) leaves the others' numbers
                print(f"  {framework} {variant}: failed: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
                continue
            clocks[(framework, variant)].append(clock)
            print(f"  {framework} {variant}: {clock.rate():.3f} steps/s (warm-up {clock.warmup_seconds():.1f} s), "
                  f"loss {clock.loss:.3f}", flush=True)
    rows = []
    for (framework, variant), done in clocks.items():
        if not done:
            continue
        top = max(done, key=StepClock.rate)
        rows.append((f"{framework} train", variant, top.warmup_seconds(), top.rate(), f"loss {top.loss:.3f}"))
    return rows


# -- report ------------------------------------------------------------------------------------------------
def _cpu() -> str:
    with open("/proc/cpuinfo") as fh:
        return next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), "?")


def print_table(kind: str, rows: list[tuple]) -> None:
    print(f"\n{kind}: {'what':<34} {'path':<14} {'first/warm-up s':>15} {'per s':>9} {'vs first row':>12}  note")
    base: dict[str, float] = {}
    for what, path, first, rate, note in rows:
        base.setdefault(what, rate)
        print(f"{'':{len(kind) + 1}} {what:<34} {path:<14} {first:>15.1f} {rate:>9.3f} {rate / base[what]:>11.2f}x  "
              f"{note}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="base")
    parser.add_argument("--models", default="bert,vit", help="comma list of bert, vit")
    parser.add_argument("--only", default="pipeline,trainer,accelerate,lightning")
    parser.add_argument("--skip", default="", help="comma list of variants to leave out, e.g. bf16+compile")
    parser.add_argument("--inputs", type=int, default=100, help="pipeline inputs per pass")
    parser.add_argument("--pipeline-batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for every variant (on a shared machine 1 avoids OpenMP oversubscription)")
    parser.add_argument("--cache-dir", default=None,
                        help="cpuboost's persistent cache for the pipelines ('off': none); default a fresh one, "
                             "so the first pass is a new user's")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each variant (best kept; the machine is shared)")
    ns = parser.parse_args(argv)
    ns.only, ns.skip = ns.only.split(","), ns.skip.split(",")
    if ns.threads:
        torch.set_num_threads(ns.threads)
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(f"machine: {_cpu()}, {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"transformers {transformers.__version__}; load {os.getloadavg()[0]:.1f}", flush=True)
    tables = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ns.models.split(","):
            print(f"{kind} ({ns.size}):", flush=True)
            rows = bench_pipeline(kind, ns, Path(tmp)) if "pipeline" in ns.only else []
            tables[kind] = rows + bench_training(kind, ns, Path(tmp))
    for kind, rows in tables.items():
        print_table(f"{kind}-{ns.size}", rows)
    print(f"\nload average at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
