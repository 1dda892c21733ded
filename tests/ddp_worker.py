"""Run by test_trainer under `torch.distributed.run --nproc_per_node 2`: trains 3 steps with the real Trainer, then
each process dumps its EMA and model parameters and its first batch, so the test can compare the processes."""

import sys
from pathlib import Path

import torch

from liquid_diffusion.config import TrainConfig
from liquid_diffusion.trainer import Trainer

folder, out = Path(sys.argv[1]), Path(sys.argv[2])
config = TrainConfig(
    dataset=str(folder),
    space="pixel",
    preset="micro",
    resolution=16,
    batch_size=4,
    steps=3,
    lr=1e-3,
    warmup_steps=1,
    log_every=1,
    sample_every=0,
    num_sample_images=4,
    sample_steps=2,
    num_workers=0,
    shuffle_buffer=16,
    output_dir=str(out / "out"),
)
trainer = Trainer(config)
first_batch = next(trainer._batches()).cpu()
trainer.train()
rank = trainer.accelerator.process_index
torch.save(
    {
        "ema": [p.cpu() for p in trainer.ema.shadow_params],
        "params": [p.detach().cpu() for p in trainer.accelerator.unwrap_model(trainer.model).parameters()],
        "first_batch": first_batch,
        "num_processes": trainer.accelerator.num_processes,
    },
    out / f"rank{rank}.pt",
)
