"""Run one training process under torchrun; test_train.py checks the ranks agree.

usage: torchrun --nproc_per_node N tests/ddp_worker.py CONFIG_JSON DUMP_DIR
Trains with the TrainConfig in CONFIG_JSON, then writes this rank's decoder weights to
DUMP_DIR/rank<R>.pt.
"""
import sys
from pathlib import Path

import torch

from overfill.train import TrainConfig, Trainer

if __name__ == "__main__":
    trainer = Trainer(TrainConfig.from_json(Path(sys.argv[1])))
    trainer.run()
    decoder = trainer.accelerator.unwrap_model(trainer.decoder)
    torch.save(decoder.state_dict(), Path(sys.argv[2]) / f"rank{trainer.accelerator.process_index}.pt")
