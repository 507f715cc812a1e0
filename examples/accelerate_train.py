"""accelerate + cpuboost: optimize first, then prepare; bf16, gradient accumulation, save/load_state.

One process:   python examples/accelerate_train.py
Two processes: cpuboost launch --nproc-per-node 2 examples/accelerate_train.py   (or torchrun --nproc-per-node 2)
(`accelerate launch --cpu --num_processes 2` starts only one process with accelerate 1.16.)
"""
import argparse
import hashlib
import json
import shutil
import tempfile

import torch
import transformers
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

import cpuboost


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--out", help="write each rank's loss and weight digest here (rank 0 writes the list)")
    cli = parser.parse_args()

    accelerator = Accelerator(cpu=True, mixed_precision="bf16", gradient_accumulation_steps=2)
    torch.manual_seed(0)  # every rank starts from the same weights
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=32, num_labels=3)
    model = transformers.BertForSequenceClassification(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)

    model, optimizer = cpuboost.optimize(model, optimizer, dtype="bf16")      # cpuboost first,
    model, optimizer = accelerator.prepare(model, optimizer)                  # then accelerate

    gen = torch.Generator().manual_seed(1 + accelerator.process_index)        # each rank its own shard
    for _ in range(cli.steps):
        ids = torch.randint(1, 64, (8, 12), generator=gen)
        with accelerator.accumulate(model):
            loss = model(input_ids=ids, labels=ids[:, 1] % 3).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()

    folder = [tempfile.mkdtemp() if accelerator.is_main_process else None]   # one folder for every rank
    broadcast_object_list(folder)
    accelerator.save_state(folder[0])                                          # checkpoint and restore
    accelerator.wait_for_everyone()
    accelerator.load_state(folder[0])
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(folder[0])
    trained = cpuboost.unwrap(accelerator.unwrap_model(model))                # the user's BertFor... itself
    digest = hashlib.sha256(b"".join(t.detach().numpy().tobytes() for t in trained.state_dict().values()))
    report = {"rank": accelerator.process_index, "ranks": accelerator.num_processes, "loss": loss.item(),
              "type": str(accelerator.distributed_type), "class": type(trained).__name__,
              "weights": digest.hexdigest()}
    reports = [report]
    if accelerator.num_processes > 1:
        reports = [None] * accelerator.num_processes
        torch.distributed.all_gather_object(reports, report)
    if accelerator.is_main_process:
        print(json.dumps(reports))
        if cli.out:
            with open(cli.out, "w") as fh:
                json.dump(reports, fh)
    accelerator.end_training()  # destroys the process group: gloo's threads left running abort the exit


if __name__ == "__main__":
    main()
