"""One method spec trained three ways, on the same data, model, optimizer and seed.

    PYTHONPATH=src python scripts/three_way.py --out runs/three-way \\
        --method "gradsamp:strategy=pe:2;ssprop:keep=0.6" --subset 2048 --epochs 6 --seeds 0 1 2

Runs ``greenprop train`` (the reference trainer, in-process), PyTorch Lightning with
``greenprop.integrations.lightning.GreenpropCallback`` and the Hugging Face Trainer with
``greenprop.integrations.hf.GreenpropTrainer``: zoo CNN, SGD with momentum and weight
decay, constant LR, batches shuffled by ``(seed, epoch)`` in every framework. Each run
writes ``OUT/<framework>/seed<N>/metrics.json`` (a finished run is skipped when the
script runs again); the script prints a Markdown table of counted FLOPs and test
accuracy per framework, and the largest weight difference from the reference run.
Needs the ``lightning`` and ``text`` extras.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from greenprop import data as gp_data
from greenprop.train.checkpoint import load_checkpoint, save_checkpoint, write_json
from greenprop.train.config import TrainConfig
from greenprop.train.evaluate import evaluate
from greenprop.train.optimizers import make_optimizer
from greenprop.train.setup import create_model
from greenprop.train.trainer import Trainer

FRAMEWORKS = ("greenprop", "lightning", "hf")


def _model(config: TrainConfig, info: gp_data.DatasetInfo) -> torch.nn.Module:
    torch.manual_seed(config.seed)  # as the reference trainer does before building its model
    return create_model(config, info)


def _optimizer(config: TrainConfig, params: Any) -> torch.optim.Optimizer:
    c = config
    return make_optimizer(c.optimizer, params, lr=c.lr, weight_decay=c.weight_decay, momentum=c.momentum)


def _loss(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def run_greenprop(config: TrainConfig, pair: gp_data.DatasetPair, out: Path) -> torch.nn.Module:
    trainer = Trainer(config, out, overwrite=True, data=pair)
    trainer.fit()
    return trainer.model


def run_lightning(config: TrainConfig, pair: gp_data.DatasetPair, out: Path) -> tuple[torch.nn.Module, Any]:
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from greenprop.integrations.driver import EpochShuffle
    from greenprop.integrations.lightning import GreenpropCallback

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = _model(config, pair.info)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return _loss(self, batch)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return _optimizer(config, self.parameters())

    module = Module()
    callback = GreenpropCallback(config.method, loss_fn=_loss, seed=config.seed)
    loader = DataLoader(
        pair.train, batch_size=config.batch_size, sampler=EpochShuffle(len(pair.train), config.seed)
    )
    trainer = pl.Trainer(
        max_epochs=config.epochs,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    trainer.fit(module, loader)
    return module.net, callback


def run_hf(config: TrainConfig, pair: gp_data.DatasetPair, out: Path) -> tuple[torch.nn.Module, Any]:
    from transformers import TrainingArguments

    from greenprop.integrations.hf import Classifier, GreenpropTrainer, LabelledDataset

    model = Classifier(_model(config, pair.info))
    args = TrainingArguments(
        output_dir=str(out / "hf-checkpoints"),
        num_train_epochs=config.epochs,
        per_device_train_batch_size=config.batch_size,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=config.seed,
    )
    trainer = GreenpropTrainer(
        method=config.method,
        model=model,
        args=args,
        train_dataset=LabelledDataset(pair.train),
        optimizers=(_optimizer(config, model.parameters()), None),
    )
    trainer.train()
    return model.model, trainer.greenprop


def _adapter_metrics(framework: str, config: TrainConfig, net: torch.nn.Module, callback: Any, pair) -> dict:
    final = evaluate(net, pair.test, batch_size=config.eval_batch_size)
    return {
        "framework": framework,
        "config": config.to_dict(),
        "epochs": callback.history,
        "summary": {
            "epochs_replaced": len(callback.driver.sampled_epochs),
            "flops": callback.total_flops(),
            "acc1": final["acc1"],
            "test_loss": final["loss"],
        },
    }


def run(framework: str, config: TrainConfig, pair: gp_data.DatasetPair, out: Path) -> dict[str, Any]:
    """Train one framework's run (or read a finished one); returns its metrics."""
    metrics_path = out / "metrics.json"
    if metrics_path.is_file():
        metrics = json.loads(metrics_path.read_text())
        if metrics.get("complete", True) and (out / "weights.pt").is_file():
            return metrics
    out.mkdir(parents=True, exist_ok=True)
    if framework == "greenprop":
        net = run_greenprop(config, pair, out)
        metrics = json.loads(metrics_path.read_text())
    else:
        net, callback = (run_lightning if framework == "lightning" else run_hf)(config, pair, out)
        metrics = _adapter_metrics(framework, config, net, callback, pair)
        write_json(metrics, metrics_path)
    save_checkpoint({"model": net.state_dict(), "epoch": config.epochs}, out / "weights.pt")
    return metrics


def _flops(metrics: dict[str, Any]) -> tuple[float, float]:
    flops = metrics["summary"]["flops"]
    value = (lambda q: q["value"]) if isinstance(flops["forward"], dict) else (lambda q: q)
    return value(flops["forward"]), value(flops["backward"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--method", default="gradsamp:strategy=pe:2;ssprop:keep=0.6")
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--subset", type=int, default=2048)
    parser.add_argument("--test-subset", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--optimizer", default="sgd", help="as greenprop train --optimizer")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--threads", type=int, default=1)
    options = parser.parse_args(argv)
    torch.set_num_threads(options.threads)
    pair = gp_data.load(options.dataset, subset=options.subset, test_subset=options.test_subset)
    rows: dict[str, list[tuple[float, float, float, int]]] = {f: [] for f in FRAMEWORKS}
    spread: dict[str, float] = {f: 0.0 for f in FRAMEWORKS}
    for seed in options.seeds:
        config = TrainConfig(
            model=options.model,
            dataset=options.dataset,
            method=options.method,
            epochs=options.epochs,
            batch_size=options.batch_size,
            lr=options.lr,
            optimizer=options.optimizer,
            lr_schedule="none",
            seed=seed,
            subset=options.subset,
            test_subset=options.test_subset,
            progress=False,
        )
        reference = None
        for framework in FRAMEWORKS:
            out = options.out / framework / f"seed{seed}"
            metrics = run(framework, config, pair, out)
            forward, backward = _flops(metrics)
            summary = metrics["summary"]
            rows[framework].append((forward, backward, summary["acc1"], summary["epochs_replaced"]))
            weights = load_checkpoint(out / "weights.pt")["model"]
            if reference is None:
                reference = weights
            diff = max(float((weights[k] - v).abs().max()) for k, v in reference.items())
            spread[framework] = max(spread[framework], diff)
            print(
                f"{framework} seed {seed}: acc1 {summary['acc1']:.2f}, FLOPs {forward:.6g} / {backward:.6g}"
            )
    print(
        f"\nmethod {options.method!r}, {options.model} on {options.dataset} "
        f"({options.subset} train / {options.test_subset} test), {options.epochs} epochs, "
        f"batch {options.batch_size}, {options.optimizer} lr {options.lr}, seeds {options.seeds}\n"
    )
    print(
        "| framework | forward FLOPs | backward FLOPs | sampled epochs | test acc@1 (%) per seed | mean "
        "| max weight diff vs greenprop train |"
    )
    print("| :-- | --: | --: | --: | :-- | --: | --: |")
    for framework in FRAMEWORKS:
        values = rows[framework]
        forwards = sorted({v[0] for v in values})
        backwards = sorted({v[1] for v in values})
        accs = [v[2] for v in values]
        print(
            f"| {framework} | {', '.join(f'{f:,.0f}' for f in forwards)} "
            f"| {', '.join(f'{b:,.0f}' for b in backwards)} | {values[0][3]} "
            f"| {', '.join(f'{a:.2f}' for a in accs)} | {statistics.mean(accs):.2f} "
            f"| {spread[framework]:.3g} |"
        )


if __name__ == "__main__":
    main()
